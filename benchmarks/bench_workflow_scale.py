"""Workflow at cohort scale: ``snakemake -n`` (building the DAG) and ``wsi-scaat summarize`` on large cohorts.

    python benchmarks/bench_workflow_scale.py [--sizes 100,1000,10000] [--summary-slides 10000]
                                              [--models erm,scaat] [--timeout 900] [--baseline DIR]

Each manifest of N slides lists symlinks to one small generated slide and its annotations (splits
train / val / test 60 / 20 / 20), in a temporary folder; the config is ``configs/demo.yaml`` with
``train.methods`` set to ``--models``. ``snakemake -n`` runs in a subprocess (its output to
/dev/null); its wall time, CPU time (user + system) and peak RSS (``wait4``) are measured. The
growth exponent between the two largest sizes is ``log(t2 / t1) / log(N2 / N1)`` (1: linear),
from the wall time and from the CPU time, which a machine shared with other jobs disturbs less. A
run past ``--timeout`` is stopped and shown as ``> timeout``.

``summarize``: ``wsi-scaat summarize`` over a results folder of ``--summary-slides`` slides of
which 2% are tiled (their logs with a warning) and 1% failed at tiling, the others ``not run``,
no model trained: a large cohort whose run has just begun.

``--baseline DIR``: also measure the checkout ``DIR`` (e.g. ``git worktree add /tmp/base <commit>``)
on the same cohorts, each size right after this checkout's run: before / after in one run.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train",) * 3 + ("val", "test")  # 60 / 20 / 20


def one_slide(folder: Path) -> tuple[Path, Path]:
    """A small synthetic slide with a lesion and its GeoJSON annotations."""
    from wsi_scaat.synth import make_slide, write_annotations

    folder.mkdir(parents=True, exist_ok=True)
    slide, ann = folder / "one.tiff", folder / "one.geojson"
    write_annotations(ann, make_slide(slide, 512, 512, seed=3, lesions=True))
    return slide, ann


def cohort(folder: Path, n: int, slide: Path, ann: Path) -> Path:
    """A manifest of ``n`` slides, each a symlink to ``slide`` (and ``ann``); returns the manifest."""
    (folder / "slides").mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        sid = f"slide_{i:05d}"
        (folder / "slides" / f"{sid}.tiff").symlink_to(slide)
        (folder / "annotations" / f"{sid}.geojson").symlink_to(ann)
        rows.append([sid, f"slides/{sid}.tiff", SPLITS[i % len(SPLITS)], i % 2, f"annotations/{sid}.geojson"])
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["slide_id", "path", "split", "label", "annotations"])
        writer.writerows(rows)
    return manifest


def config(folder: Path, manifest: Path, models: list[str]) -> Path:
    """The demo config pointed at ``manifest``, results under ``folder``."""
    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    data["cohort"] = {"name": "scale", "manifest": str(manifest)}
    data["results_dir"] = str(folder / "results")
    data["train"]["methods"] = models
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def measured(cmd: list[str], cwd: Path, timeout: float, repo: Path = ROOT) -> dict[str, Any]:
    """Wall and CPU seconds, peak RSS (MB) of ``cmd`` run with ``repo`` first on PYTHONPATH;
    ``timed_out`` when it was stopped at ``timeout``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    log = cwd / f"run.{time.time_ns()}.log"
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        pid, status, usage = 0, 0, None
        while not pid:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if not pid and time.perf_counter() - t0 > timeout:
                proc.kill()
            elif not pid:
                time.sleep(0.05)
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
           "timed_out": seconds > timeout}  # fmt: skip
    if rc and not out["timed_out"]:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{log.read_text()[-3000:]}")
    return out


def dry_run(work: Path, repo: Path, timeout: float) -> dict[str, Any]:
    """``snakemake -n`` of ``repo``'s workflow in ``work`` (a fresh working folder each time)."""
    run_dir = work / f"run.{time.time_ns()}"
    run_dir.mkdir()
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--snakefile", str(repo / "Snakefile"),
           "--directory", str(run_dir), "--configfile", str(repo / "configs" / "demo.yaml"),
           str(work / "config.yaml")]  # fmt: skip
    return measured(cmd, run_dir, timeout, repo)


def summary_results(work: Path, n: int, slide: Path, models: list[str]) -> None:
    """A results folder where 2% of the ``n`` slides are tiled, 1% failed at tiling, the rest not run."""
    res = work / "results" / "scale"
    for folder in ("tiles", "logs/tile", "logs/train"):
        (res / folder).mkdir(parents=True, exist_ok=True)
    warning = "/x/wsi_scaat/slides/tiling.py:190: UserWarning: feature 0 repaired with make_valid\n"
    for i in range(n):
        sid = f"slide_{i:05d}"
        if i % 100 == 2:
            (res / "logs" / "tile" / f"{sid}.log").write_text(f"wsi-scaat: error: {slide}: cannot open\n")
        elif i % 100 < 2:
            for suffix in (".h5", ".tissue.png", ".tissue.geojson"):
                (res / "tiles" / f"{sid}{suffix}").write_text("")
            (res / "logs" / "tile" / f"{sid}.log").write_text(warning)
    for m in models:
        (res / "logs" / "train" / f"{m}.log").write_text("epoch 1\n" * 200)


def exponent(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    """Growth exponent of ``key`` from run ``a`` to run ``b`` (None when one timed out)."""
    if a["timed_out"] or b["timed_out"]:
        return None
    return math.log(b[key] / a[key]) / math.log(b["n"] / a["n"])


def measure(sizes: list[int], summary_slides: int, models: list[str], timeout: float,
            baseline: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Dry runs at ``sizes`` and one summarize, for this checkout (and ``baseline``), in one run."""
    repos = {"after": ROOT} | ({"before": baseline} if baseline else {})
    out: dict[str, Any] = {name: {"dry_runs": [], "summarize": None} for name in repos}
    with tempfile.TemporaryDirectory(prefix="wsi-scaat-scale-") as tmp:
        folder = Path(tmp)
        slide, ann = one_slide(folder / "one")
        for n in sizes:
            work = folder / f"n{n}"
            config(work, cohort(work, n, slide, ann), models)
            for name, repo in repos.items():
                r = dry_run(work, repo, timeout) | {"n": n}
                out[name]["dry_runs"].append(r)
                line = f"snakemake -n, {n:,} slides: {_shown(r, timeout)} s (CPU {r['cpu']:.1f} s)"
                line += f", peak RSS {r['rss_mb']:,.0f} MB, load {os.getloadavg()[0]:.1f}"
                print(f"[{name}] {line}", file=sys.stderr)
        if summary_slides:
            work = folder / f"summary{summary_slides}"
            cfg = config(work, cohort(work, summary_slides, slide, ann), models)
            summary_results(work, summary_slides, slide, models)
            for name, repo in repos.items():
                cmd = [sys.executable, "-m", "wsi_scaat", "summarize", "--config", str(cfg)]
                out[name]["summarize"] = measured(cmd, work, timeout, repo) | {"n": summary_slides}
    return out


def _seconds(r: dict[str, Any], timeout: float) -> Any:
    return f"> {timeout:.0f}" if r["timed_out"] else r["seconds"]


def _shown(r: dict[str, Any], timeout: float) -> str:
    return f"> {timeout:.0f}" if r["timed_out"] else f"{r['seconds']:,.1f}"


def _exp(k: float | None) -> str:
    return "-" if k is None else f"{k:.2f}"


def rows(m: dict[str, Any], models: list[str], timeout: float) -> list[dict[str, Any]]:
    """Rows of the combined table (this checkout; the baseline's figures as references)."""
    after, before = m["after"], m.get("before")
    base = {"benchmark": "workflow scale", "unit": "s", "ratio": "-", "goal": "-"}
    out: list[dict[str, Any]] = []
    for k, r in enumerate(after["dry_runs"]):
        ref = f"CPU {r['cpu']:,.1f} s, peak RSS {r['rss_mb']:,.0f} MB"
        row = base | {"measured": f"snakemake -n, {r['n']:,} slides, {len(models)} models", "reference": ref,
                      "figure": _seconds(r, timeout)}  # fmt: skip
        if before:
            b = before["dry_runs"][k]
            row["reference"] += f"; before: {_shown(b, timeout)} s, CPU {b['cpu']:,.1f} s"
            row["reference"] += f", {b['rss_mb']:,.0f} MB"
            if not (r["timed_out"] or b["timed_out"]):
                row["ratio"] = r["seconds"] / b["seconds"]
        if r["n"] == 10_000:
            row |= {"goal": "<= 60 s, < 2 GB",
                    "goal_met": not r["timed_out"] and r["seconds"] <= 60 and r["rss_mb"] < 2048}  # fmt: skip
        out.append(row)
    if len(after["dry_runs"]) >= 2:
        a, b = after["dry_runs"][-2:]
        k, kc = exponent(a, b, "seconds"), exponent(a, b, "cpu")
        ref = f"CPU time: {_exp(kc)}; 1 = linear"
        if before:
            ba, bb = before["dry_runs"][-2:]
            ref += f"; before: {_exp(exponent(ba, bb, 'seconds'))} (CPU {_exp(exponent(ba, bb, 'cpu'))})"
        out.append(base | {"measured": f"snakemake -n growth exponent, {a['n']:,} -> {b['n']:,} slides",
                           "figure": "-" if k is None else round(k, 3), "unit": "", "reference": ref,
                           "goal": "<= 1.05", "goal_met": k is not None and k <= 1.05})  # fmt: skip
    s = after["summarize"]
    if s is not None:
        ref = f"CPU {s['cpu']:,.1f} s, peak RSS {s['rss_mb']:,.0f} MB"
        what = f"wsi-scaat summarize, {s['n']:,} slides (97% not run), {len(models)} models"
        row = base | {"measured": what, "figure": _seconds(s, timeout), "reference": ref}
        if before and before["summarize"]:
            b = before["summarize"]
            row["reference"] += f"; before: {_shown(b, timeout)} s, CPU {b['cpu']:,.1f} s"
            if not (s["timed_out"] or b["timed_out"]):
                row["ratio"] = s["seconds"] / b["seconds"]
        out.append(row)
    return out


def run(quick: bool = False, sizes: list[int] | None = None, summary_slides: int | None = None,
        models: list[str] | None = None, timeout: float = 900, baseline: Path | None = None,
        ) -> list[dict[str, Any]]:  # fmt: skip
    """Rows for the combined table (``quick``: 20 and 100 slides, summarize on 200)."""
    sizes = sizes or ([20, 100] if quick else [100, 1000, 10_000])
    summary_slides = summary_slides if summary_slides is not None else (200 if quick else 10_000)
    models = models or ["erm", "scaat"]
    return rows(measure(sizes, summary_slides, models, timeout, baseline), models, timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000", help="comma-separated manifest sizes")
    ap.add_argument("--summary-slides", type=int, default=10_000, help="slides to summarize (0: none)")
    ap.add_argument("--models", default="erm,scaat", help="train.methods of the config")
    ap.add_argument("--timeout", type=float, default=900, help="seconds after which a run is stopped")
    ap.add_argument("--baseline", type=Path, help="another checkout to measure on the same cohorts")
    args = ap.parse_args()
    print(machine(), f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    models = args.models.split(",")
    out = run(sizes=[int(s) for s in args.sizes.split(",")], summary_slides=args.summary_slides,
              models=models, timeout=args.timeout, baseline=args.baseline)  # fmt: skip
    print(table(out, ["measured", "figure", "unit", "reference", "ratio", "goal", "goal_met"]))


if __name__ == "__main__":
    main()
