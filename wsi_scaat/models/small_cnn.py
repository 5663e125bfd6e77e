"""A small all-convolutional patch classifier, fast on a few CPU cores for 48-128 px patches."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Downsample = Literal["stride", "blur", "avgpool"]


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution (no bias), batch norm, ReLU (not in-place, so hooks and saliency see clean values)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class Blur(nn.Module):
    """Depthwise 3 x 3 binomial low-pass ([1, 2, 1] outer [1, 2, 1] / 16), stride 1, reflect padding.

    Put before a stride-2 convolution it is the anti-aliasing filter of Zhang (ICML 2019, "Making
    convolutional networks shift-invariant again"): the convolution then subsamples a signal with
    little energy above its new Nyquist frequency, and the input gradient, which passes through the
    same (symmetric) filter, no longer alternates from one pixel to the next. The kernel is a
    persistent buffer, so a checkpoint of a model with blur does not load into one without.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        kernel = (k[:, None] * k[None, :]) / 16.0
        self.register_buffer("kernel", kernel.expand(channels, 1, 3, 3).clone())
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.kernel.to(x.dtype), groups=self.channels)


def down_block(cin: int, cout: int, downsample: Downsample) -> nn.Sequential:
    """A conv-BN-ReLU block halving the resolution: stride 2, blur then stride 2, or average pooling."""
    if downsample == "stride":
        return conv_bn_relu(cin, cout, 2)
    if downsample == "blur":
        return nn.Sequential(Blur(cin), *conv_bn_relu(cin, cout, 2))
    if downsample == "avgpool":
        return nn.Sequential(*conv_bn_relu(cin, cout, 1), nn.AvgPool2d(2))
    raise ValueError(f"downsample must be 'stride', 'blur' or 'avgpool', got {downsample!r}")


class SmallCNN(nn.Module):
    """conv(3->w), down(w->2w), down(2w->4w), down(4w->4w), global average pool, dropout, linear.

    ``down`` halves the resolution (``downsample``): a stride-2 convolution (``"stride"``; its input
    gradients alias onto the pixel grid), a binomial blur then a stride-2 convolution (``"blur"``,
    anti-aliased, a few percent more compute), or a stride-1 convolution then 2 x 2 average pooling
    (``"avgpool"``, about 4x the compute of those layers). Any input of 16 px or more works (the
    feature map of a 16-px input is 2x2). ``features`` ends with the last convolutional block (a
    natural Grad-CAM layer); ``head`` is pool + dropout + linear.
    """

    def __init__(
        self, num_classes: int, width: int = 32, dropout: float = 0.1, downsample: Downsample = "blur"
    ) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn_relu(3, w),
            down_block(w, 2 * w, downsample),
            down_block(2 * w, 4 * w, downsample),
            down_block(4 * w, 4 * w, downsample),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
