"""Training-step cost of each method relative to ERM, on one model and one batch.

A step is what the training loop does per batch: zero_grad, ``method.step`` (forwards, input
gradients, loss), ``loss.backward()`` and the optimiser step. Warm-up steps are not timed; the
methods take turns over several rounds so that machine noise hits them alike:

    python benchmarks/bench_training.py [--model small_cnn|resnet18] [--batch 64] [--size 48]
                                        [--device cpu] [--rounds 5] [--steps 10] [--floor]

Models come from ``wsi_scaat.models.build_model`` when that registry is importable; otherwise
small_cnn is a local stand-in (4 x conv-BN-ReLU, 16-32-64-64 channels, stride 2, global average
pooling, linear head) and resnet18 is torchvision's ``resnet18(weights=None)``. The ratios columns
divide by ERM's mean step time and by its median per-round time (robust to other load).

``--floor`` also times the passes a step is made of, on the same model, batch and precision: a
training forward + full backward (ERM's step without the optimiser), a forward + input-only backward
with BatchNorm's batch statistics (a PGD step), the same with running statistics (SCAAT's saliency
pass, ``saliency_bn: eval``), both in the layout and precision SCAAT gives them (``bf16_search``),
and the optimiser step. SCAAT's default objective needs one saliency
pass, ``steps`` PGD passes and two training forward + backward passes (clean and perturbed) per
step, so the sum of those, divided by ERM's passes, is the lowest ratio any implementation of that
objective can reach; the rest of the measured ratio is what the implementation adds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsi_scaat.training.methods import (  # noqa: E402
    AdvGradConfig,
    Method,
    ScaatConfig,
    SgtConfig,
    build_method,
)

from common import machine, table  # noqa: E402

NUM_CLASSES = 2


class SmallCNN(nn.Module):
    """Stand-in small CNN: 4 x (conv 3x3 stride 2, BN, ReLU), global average pooling, linear head."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.25  # the models normalise internally
        return self.head(self.features(x).mean((2, 3)))


def make_model(name: str) -> tuple[nn.Module, str]:
    """The model and where it came from."""
    try:
        from wsi_scaat.models import ModelConfig, build_model
    except ImportError:
        if name == "resnet18":
            from torchvision.models import resnet18

            return resnet18(weights=None, num_classes=NUM_CLASSES), "torchvision resnet18(weights=None)"
        return SmallCNN(NUM_CLASSES), "local stand-in (wsi_scaat.models not importable)"
    return build_model(ModelConfig(name=name), NUM_CLASSES), "wsi_scaat.models.build_model"


def methods(device: str) -> list[tuple[str, Method]]:
    """(label, method) of every configuration timed; ERM first."""
    out: list[tuple[str, Method]] = [("erm", build_method("erm", None))]
    from wsi_scaat.training.methods.base import fast_bf16

    train = argparse.Namespace(scaat=ScaatConfig(warmup_epochs=0), sgt=SgtConfig(), advgrad=None)
    auto = "on" if fast_bf16(torch.device(device)) else "off"
    d = ScaatConfig()
    knobs = f"steps={d.steps}, saliency_bn={d.saliency_bn}, mask={d.mask}"
    out.append((f"scaat (default: {knobs}, bf16 search auto={auto})", build_method("scaat", train)))
    train.scaat = ScaatConfig(warmup_epochs=0, bf16_search=False)
    out.append(("scaat (default, float32 search)", build_method("scaat", train)))
    for label, changes in (("steps=1", {"steps": 1}), ("saliency_bn=train", {"saliency_bn": "train"}),
                           ("saliency_bn=eval", {"saliency_bn": "eval"})):  # fmt: skip
        if any(getattr(d, k) != v for k, v in changes.items()):
            train.scaat = ScaatConfig(warmup_epochs=0, **changes)
            out.append((f"scaat ({label})", build_method("scaat", train)))
    for variant in ("l1", "elastic", "group"):
        for mode in ("fast", "iterative"):
            train.advgrad = AdvGradConfig(variant=variant, mode=mode)
            out.append((f"advgrad {variant} {mode}", build_method("advgrad", train)))
    out.append(("sgt", build_method("sgt", train)))
    return out


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    method: Method,
    x: Any,
    y: Any,
    amp: torch.dtype | None = None,
) -> None:
    """One training-loop step (the method's passes under autocast to ``amp`` when given, as the loop)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        out = method.step(model, x, y, progress=10.0)
    out.loss.backward()
    opt.step()


@dataclass
class Bench:
    """A seeded model, its optimiser and one batch on ``dev``, in the layout and precision training uses."""

    dev: torch.device
    model: nn.Module
    source: str
    opt: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    dtype: torch.dtype | None  # autocast dtype, None for float32
    clock: Callable[[], float]
    sync: Callable[[], None]

    @classmethod
    def build(cls, model_name: str, batch: int, size: int, device: str, channels_last: bool | str,
              amp: bool | str, cpu_time: bool) -> Bench:  # fmt: skip
        """``amp`` and ``channels_last`` resolve as ``train.amp`` / ``train.channels_last`` on
        ``device``; ``cpu_time``: one torch thread, and the process's CPU time as the clock."""
        from wsi_scaat.training.loop import amp_dtype, use_channels_last

        dev = torch.device(device)
        if cpu_time:
            torch.set_num_threads(1)
        torch.manual_seed(0)
        model, source = make_model(model_name)
        fmt = torch.channels_last if use_channels_last(dev, channels_last) else torch.contiguous_format
        model = model.to(dev, memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        x = torch.rand(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
        y = torch.randint(0, NUM_CLASSES, (batch,), device=dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        clock = time.process_time if cpu_time else time.perf_counter
        return cls(dev, model, source, opt, x, y, amp_dtype(dev, amp), clock, sync)


def measure(model_name: str = "small_cnn", batch: int = 64, size: int = 48, device: str = "cpu",
            rounds: int = 5, steps: int = 10, warmup: int = 3, only: list[str] | None = None,
            channels_last: bool | str = "auto", amp: bool | str = "auto",
            cpu_time: bool = False) -> tuple[dict[str, list[float]], str]:  # fmt: skip
    """Per-round mean step seconds of each method (label -> list, ERM first) and the model's source.

    ``amp`` and ``channels_last`` resolve as ``train.amp`` / ``train.channels_last`` do on ``device``
    (``auto``: what training runs with). ``cpu_time``: one torch thread, and the process's CPU time
    per step instead of wall time (the compute cost, which other load on the machine does not change).
    """
    b = Bench.build(model_name, batch, size, device, channels_last, amp, cpu_time)
    model, opt, x, y, dtype, clock, sync = b.model, b.opt, b.x, b.y, b.dtype, b.clock, b.sync
    runs = [(k, m) for k, m in methods(device) if k == "erm" or not only or k.startswith(tuple(only))]

    times: dict[str, list[float]] = {k: [] for k, _ in runs}
    for _label, method in runs:
        for _ in range(warmup):
            train_step(model, opt, method, x, y, dtype)
    for _ in range(rounds):
        for label, method in runs:
            sync()
            t0 = clock()
            for _ in range(steps):
                train_step(model, opt, method, x, y, dtype)
            sync()
            times[label].append((clock() - t0) / steps)
    return times, b.source


def pass_floor(model_name: str = "small_cnn", batch: int = 64, size: int = 48, device: str = "cpu",
               repeats: int = 10, warmup: int = 2, channels_last: bool | str = "auto",
               amp: bool | str = "auto", cpu_time: bool = False) -> dict[str, float]:  # fmt: skip
    """Mean seconds of each pass of a training step (see the module docstring), methods' precision."""
    import torch.nn.functional as F

    from wsi_scaat.training.methods.base import frozen_bn_stats, search_autocast, search_layout
    from wsi_scaat.training.methods.scaat import bn_eval, search_in_bf16

    b = Bench.build(model_name, batch, size, device, channels_last, amp, cpu_time)
    model, opt, x, y, dtype, clock, sync, dev = b.model, b.opt, b.x, b.y, b.dtype, b.clock, b.sync, b.dev

    def autocast() -> Any:
        return torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)

    def train_pass() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    with autocast():  # SCAAT's search passes: bf16 of their own where training is not bf16 already
        search_bf16 = search_in_bf16(dev, ScaatConfig().bf16_search)

    def input_pass(eval_bn: bool) -> None:  # as SCAAT runs it: its layout and precision
        xg = search_layout(x.detach()).requires_grad_(True)
        with frozen_bn_stats(model), bn_eval(model, eval_bn), autocast(), search_autocast(xg, search_bf16):
            target = model(xg).gather(1, y[:, None]).sum()
        torch.autograd.grad(target, xg)

    passes = {"forward + backward (train)": train_pass, "forward + input backward (batch stats)":
              lambda: input_pass(False), "forward + input backward (running stats)": lambda: input_pass(True),
              "optimiser step": opt.step}  # fmt: skip
    out = {}
    for label, func in passes.items():
        for _ in range(warmup):
            func()
        sync()
        t0 = clock()
        for _ in range(repeats):
            func()
        sync()
        out[label] = (clock() - t0) / repeats
    opt.zero_grad(set_to_none=True)
    return out


def floor_rows(passes: dict[str, float], steps: int, measured: float | None = None) -> list[dict[str, Any]]:
    """ERM's and SCAAT's step as sums of passes (ms) and SCAAT's lowest possible ratio to ERM."""
    fb, pgd = passes["forward + backward (train)"], passes["forward + input backward (batch stats)"]
    sal, opt = passes["forward + input backward (running stats)"], passes["optimiser step"]
    erm = fb + opt
    scaat = sal + steps * pgd + 2 * fb + opt
    rows = [{"what": label, "ms": 1000 * t} for label, t in passes.items()]
    rows.append({"what": "ERM step = forward + backward + optimiser", "ms": 1000 * erm, "x erm": 1.0})
    rows.append({"what": f"SCAAT floor = saliency + {steps} PGD + 2 x (forward + backward) + optimiser",
                 "ms": 1000 * scaat, "x erm": scaat / erm})  # fmt: skip
    if measured is not None:
        rows.append({"what": "SCAAT measured (this run's step table)", "x erm": measured})
    return rows


def summary(times: dict[str, list[float]]) -> list[dict[str, Any]]:
    """ms/step and ratios to ERM (of means, and of per-round medians) of each method."""
    erm, erm_median = statistics.mean(times["erm"]), statistics.median(times["erm"])
    return [
        {"method": label, "ms/step": 1000 * statistics.mean(t), "x erm": statistics.mean(t) / erm,
         "x erm (medians)": statistics.median(t) / erm_median}
        for label, t in times.items()
    ]  # fmt: skip


def run(quick: bool = False, **kw: Any) -> list[dict[str, Any]]:
    """Rows for the combined table: each method's CPU ms/step (one thread, the precision training runs
    with) against ERM's, on the real cohort's model and patches (goal: SCAAT's default <= 2.5x)."""
    opts: dict[str, Any] = {"rounds": 5, "steps": 4, "warmup": 2, "size": 64, "cpu_time": True} | kw
    if quick:  # ERM and one configuration of each method, few steps
        only = ["scaat (default:", "advgrad l1 fast", "sgt"]
        opts = {"rounds": 2, "steps": 1, "warmup": 1, "only": only, "size": 64, "cpu_time": True} | kw
    times, _ = measure(**opts)
    rows = summary(times)
    erm = rows[0]["ms/step"]
    clock = "CPU time, 1 thread" if opts.get("cpu_time") else "wall"
    what = f"{opts.get('model_name', 'small_cnn')}, batch {opts.get('batch', 64)}, {opts['size']} px, {clock}"
    out = []
    for r in rows:
        row = {"benchmark": "training", "measured": f"step: {r['method']} ({what})", "figure": r["ms/step"]}
        row |= {"unit": "ms/step", "reference": f"{erm:,.1f} ms/step erm", "ratio": r["x erm"], "goal": "-"}
        if r["method"].startswith("scaat (default:"):  # the configuration SCAAT runs with
            row |= {"goal": "<= 2.5x", "goal_met": r["x erm"] <= 2.5}
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["small_cnn", "resnet18"], default="small_cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=48, help="patch side in pixels")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of turns (each method once per round)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per method before timing")
    ap.add_argument("--only", nargs="*", help="time only the labels starting with these (plus erm)")
    switch = {"auto": "auto", "true": True, "false": False}
    ap.add_argument("--channels-last", choices=list(switch), default="auto", help="as train.channels_last")
    ap.add_argument("--amp", choices=list(switch), default="auto", help="as train.amp (auto: bf16 if native)")
    ap.add_argument("--cpu-time", action="store_true", help="one torch thread; CPU time per step, not wall")
    ap.add_argument("--floor", action="store_true", help="also time the passes a step is made of")
    args = ap.parse_args()
    times, source = measure(args.model, args.batch, args.size, args.device, args.rounds, args.steps,
                            args.warmup, args.only, switch[args.channels_last], switch[args.amp],
                            args.cpu_time)  # fmt: skip
    print(f"machine: {machine()}")
    from wsi_scaat.training.loop import amp_dtype, use_channels_last

    dev = torch.device(args.device)
    layout = "channels_last" if use_channels_last(dev, switch[args.channels_last]) else "NCHW"
    precision = amp_dtype(dev, switch[args.amp]) or "float32"
    clock = "CPU time per step, 1 torch thread" if args.cpu_time else "wall time per step"
    print(f"model: {args.model} ({source}), batch {args.batch}, {args.size} px, {layout}, {precision}, "
          f"device {args.device}; {clock}")  # fmt: skip
    print(f"{args.rounds} rounds x {args.steps} timed steps per method, after {args.warmup} warm-up steps")
    rows = summary(times)
    print(table(rows, ["method", "ms/step", "x erm", "x erm (medians)"]))
    if args.floor:
        repeats = args.rounds * args.steps
        passes = pass_floor(args.model, args.batch, args.size, args.device, repeats, args.warmup,
                            switch[args.channels_last], switch[args.amp], args.cpu_time)  # fmt: skip
        scaat = next(r["x erm"] for r in rows if r["method"].startswith("scaat (default:"))
        print(f"passes of one step ({repeats} timed repeats each):")
        print(table(floor_rows(passes, ScaatConfig().steps, scaat), ["what", "ms", "x erm"]))


if __name__ == "__main__":
    main()
