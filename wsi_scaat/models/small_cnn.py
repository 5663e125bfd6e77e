"""A small all-convolutional patch classifier, fast on a few CPU cores for 48-128 px patches."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution (no bias), batch norm, ReLU (not in-place, so hooks and saliency see clean values)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class SmallCNN(nn.Module):
    """conv(3->w), conv/2(w->2w), conv/2(2w->4w), conv/2(4w->4w), global average pool, dropout, linear.

    Any input of 16 px or more works (the feature map of a 16-px input is 2x2). ``features`` ends with
    the last convolutional block (a natural Grad-CAM layer); ``head`` is pool + dropout + linear.
    """

    def __init__(self, num_classes: int, width: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn_relu(3, w),
            conv_bn_relu(w, 2 * w, 2),
            conv_bn_relu(2 * w, 4 * w, 2),
            conv_bn_relu(4 * w, 4 * w, 2),
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
