"""Every benchmark in one run and one table, also written to docs/benchmarks.md (``make benchmark``).

    python benchmarks/run_all.py [--quick] [--only tiling,saliency,metrics,training,...] [--out PATH]

Each ``bench_*.py`` module exposes ``run(quick=False) -> list[dict]``; its rows share the columns
below (``ratio`` is the figure over the reference, ``met`` whether the goal holds). A module that also
sets ``last_report`` (markdown) after ``run`` gets a section of its own in the document. A full run
writes docs/benchmarks.md; ``--quick`` (small inputs) or ``--only`` print the table and write only
with ``--out``. Benchmarks are not tests: nothing here fails on a time.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, read_sections, section_block, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
COLUMNS = ["benchmark", "measured", "figure", "unit", "reference", "ratio", "goal", "met"]
#: The doc's text from this line on is kept as it is when the doc is written again.
KEPT = "<!-- Sections below this line are written by hand; run_all.py keeps them. -->"

#: name -> (module, what is compared), in the order they run and appear in the table.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "tiling": ("bench_tiling", "`wsi-scaat tile` (tissue mask, patch grid, HDF5 store; one thread per core) "
               "vs tiatoolbox's `SlidingWindowPatchExtractor` writing the same patches into the same store "
               "format, and vs decoding all of level 0 (1 thread and one per core), on one synthetic slide. "
               "MP/s counts the patch pixels written (tissue only) for the tilers, level-0 pixels for raw "
               "decode."),
    "saliency": ("bench_saliency", "the saliency stage `run_saliency` end to end (patch store read, gradient "
                 "attribution, saliency store write) vs its floor: a bare forward + backward to the input of "
                 "the same model on the same batches already in memory, same batch size and device (median "
                 "of alternating runs, in a subprocess with `OMP_WAIT_POLICY=PASSIVE`)."),
    "metrics": ("bench_metrics", "the saliency metrics of `wsi_scaat.metrics` vs Quantus on the same "
                "inputs (torch on one thread; ours best of 3 runs, Quantus one run; `max diff` compares the "
                "two results)."),
    "training": ("bench_training", "one training step (zero_grad, method step, backward, optimiser step) of "
                 "each method vs ERM's, same model and batch, methods taking turns over several rounds."),
    "cpu_precision": ("bench_cpu_precision", "bfloat16 autocast + channels-last against float32 on CPU: "
                      "training steps of ERM and SCAAT, the saliency stage, and ERM and SCAAT trained with 3 "
                      "seeds in each precision (accuracy and map metrics against the float32 seeds' spread); "
                      "details in its own section below."),
    "stitching": ("bench_stitching", "out-of-core `stitch` (dask, level 0 and pyramid written to zarr) vs "
                  "`stitch_dense` (one numpy canvas, nothing written) on the same saliency store, and its "
                  "speed and peak RSS on a 100,000 x 100,000 px slide (each in its own subprocess)."),
    "workflow_scale": ("bench_workflow_scale", "`snakemake -n` (the DAG of the whole workflow, before any "
                       "job runs) on manifests of 100, 1,000 and 10,000 slides (symlinks to one small slide, "
                       "2 models), with its peak RSS and the growth exponent of its time between the two "
                       "largest; and `wsi-scaat summarize` on 10,000 slides, most of them `not run` (each in "
                       "a subprocess; see 'Cohorts of 10,000 slides' below for before / after)."),
}  # fmt: skip


def metrics_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """bench_metrics' own rows (metric, maps, ours / quantus maps/s, speed-up, max diff) as table rows."""
    out = []
    for r in rows:
        if "figure" in r:  # already in the common format
            out.append(r)
            continue
        q = r.get("quantus maps/s")
        ref = f"{q:,.1f} maps/s Quantus (max diff {r.get('max diff', '?')})" if q else "Quantus not installed"
        what = f"{r['metric']}: {r['maps']} maps of {r['map px']} px"
        ratio = r.get("speed-up", "-")
        out.append({"measured": what, "figure": r["ours maps/s"], "unit": "maps/s", "reference": ref})
        out[-1] |= {"ratio": ratio, "goal": "-"}
    return out


#: Benchmarks whose ``run`` rows need converting to the common columns.
ADAPT = {"metrics": metrics_rows}


#: Markdown sections written by the benchmarks of this run (a module's ``last_report`` after ``run``).
SECTIONS: dict[str, str] = {}


def run_benchmark(name: str, quick: bool) -> list[dict[str, Any]]:
    """The rows of one benchmark; a row saying why when its module is missing or it fails."""
    module = BENCHMARKS[name][0]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return [{"benchmark": name, "measured": f"not run: benchmarks/{module}.py not found"}]
    try:
        rows = ADAPT.get(name, list)(mod.run(quick=quick))
    except Exception as exc:
        traceback.print_exc()
        return [{"benchmark": name, "measured": f"failed: {type(exc).__name__}: {exc}".splitlines()[0]}]
    if getattr(mod, "last_report", None):
        SECTIONS[name] = mod.last_report
    return [{"benchmark": name, **r} for r in rows]


def present(row: dict[str, Any]) -> dict[str, Any]:
    """A row as shown: ratio as ``1.23x``, ``met`` as yes / no, missing cells empty."""
    out = {c: row.get(c, "") for c in COLUMNS}
    if isinstance(out["ratio"], int | float):
        out["ratio"] = f"{out['ratio']:.2f}x"
    met = row.get("goal_met", row.get("met"))
    out["met"] = {True: "yes", False: "no"}.get(met, "" if met is None else str(met))
    return out


def revision() -> str:
    """The git commit measured (``+`` when the working tree has changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def settings() -> str:
    """torch's thread count and the threading environment variables that are set."""
    import torch

    env = [
        f"{k}={os.environ[k]}"
        for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")
        if k in os.environ
    ]
    return ", ".join([f"torch threads {torch.get_num_threads()}", *env])


def document(
    header: str, body: str, names: list[str], quick: bool, seconds: dict[str, float], old: str = ""
) -> str:
    """docs/benchmarks.md: the machine, the table, how to reproduce, what each benchmark compares, then
    the benchmarks' own sections: this run's, or those of ``old`` (the previous file) not rerun."""
    timing = ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items())
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make benchmark` (`benchmarks/run_all.py`); do not edit by hand.",
        "",
        header,
        "",
        body,
        "",
        f"Wall time per benchmark: {timing}.",
        "",
        "`figure` is this project's measurement and `ratio` the figure over the `reference` figure "
        "(throughput for tiling, saliency, metrics and stitching speed; cost for training steps and peak "
        "RSS); `met` says whether the `goal` holds. Times are wall clock, best of several runs where a "
        "benchmark repeats; on a machine shared with other jobs (see the load average above) expect noise "
        "of 10% or more, and more on the ratios of multi-threaded runs. Benchmarks are not tests: no test "
        "asserts a time.",
        "",
        "Under heavy CPU load (load average well above the core count), OpenMP's default spin-waiting slows "
        "torch's thread pool erratically: the bare forward + backward loop ran up to 2x slower than the "
        "saliency stage, and training ratios swing. The saliency benchmark therefore runs in a subprocess "
        "with `OMP_WAIT_POLICY=PASSIVE` (unless set); for the others, prefer an idle machine or "
        "`OMP_WAIT_POLICY=PASSIVE make benchmark`. The metrics benchmark runs torch with one thread.",
        "",
        "## Reproduce",
        "",
        "```bash",
        "make benchmark                                   # all, full size; writes this file",
        ".venv/bin/python benchmarks/run_all.py --quick   # small inputs (~1-2 min); prints the table only",
        ".venv/bin/python benchmarks/run_all.py --only saliency,training --out /tmp/b.md   # a subset",
        ".venv/bin/python benchmarks/bench_tiling.py --help   # each benchmark alone, with its own options",
        "```",
        "",
        "Synthetic slides and saliency stores are generated on the first run and cached in "
        "`benchmarks/.cache/` (`WSI_SCAAT_BENCH_CACHE` moves it); the 100,000 x 100,000 px saliency store "
        "takes a few minutes to generate once.",
        "",
        "## What is compared",
        "",
    ]  # fmt: skip
    lines += [f"* **{n}** (`benchmarks/{BENCHMARKS[n][0]}.py`): {BENCHMARKS[n][1]}" for n in names]
    if quick:
        lines[0] += " (quick run: small inputs)"
    sections = read_sections(old) | {name: section_block(name, text) for name, text in SECTIONS.items()}
    for block in sections.values():
        lines += ["", block]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small inputs (a smoke run); does not write the doc")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--out", type=Path, help=f"markdown file to write (default for a full run: {DOC})")
    args = ap.parse_args()
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - set(BENCHMARKS))
        if unknown:
            ap.error(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    out = args.out or (None if args.quick or args.only else DOC)

    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    load_start = os.getloadavg()[0]
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rows += run_benchmark(name, args.quick)
        seconds[name] = time.perf_counter() - t0
        print(f"[{i}/{len(names)}] {name}: {seconds[name]:.0f} s", file=sys.stderr, flush=True)

    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    mode = "quick (small inputs)" if args.quick else "full"
    load = f"1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    minutes = sum(seconds.values()) / 60
    header = f"machine: {machine()}\n\ndate: {date}, commit {revision()}, {mode} run, {minutes:.1f} min; "
    header += f"{settings()}; {load}"
    body = table([present(r) for r in rows], COLUMNS)
    print(f"\n{header}\n\n{body}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        old = out.read_text(encoding="utf-8") if out.exists() else ""
        generated, kept = old.split(KEPT, 1) if KEPT in old else (old, None)
        tail = "" if kept is None else "\n" + KEPT + kept
        out.write_text(document(header, body, names, args.quick, seconds, generated) + tail)
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
