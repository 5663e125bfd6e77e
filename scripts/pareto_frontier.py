"""Which runs of an evaluation lie on the Pareto frontier of chosen metrics (higher is better).

    python scripts/pareto_frontier.py results/hard/evaluation/runs.csv \
        [--metrics accuracy,deletion_gap,auroc_localisation]

Reads the per-run estimates (means over seeds) of ``runs.csv`` (written by the evaluation) and prints,
for every run, its figures and whether another run is at least as good on every metric and better on
one (dominated), naming the runs that dominate it. Metrics where lower is better are negated by
prefixing them with ``-`` (e.g. ``-deletion_auc``).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def frontier(rows: list[dict[str, float]], metrics: list[str]) -> dict[str, list[str]]:
    """Run -> the runs that dominate it (empty: on the frontier)."""

    def value(row: dict[str, float], metric: str) -> float:
        return -row[metric[1:]] if metric.startswith("-") else row[metric]

    out: dict[str, list[str]] = {}
    for a in rows:
        out[str(a["run"])] = [
            str(b["run"])
            for b in rows
            if b is not a
            and all(value(b, m) >= value(a, m) for m in metrics)
            and any(value(b, m) > value(a, m) for m in metrics)
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs_csv", type=Path)
    ap.add_argument("--metrics", default="accuracy,deletion_gap,auroc_localisation")
    args = ap.parse_args()
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    with args.runs_csv.open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    rows = [{"run": r["run"], **{m.lstrip("-"): float(r[m.lstrip("-")]) for m in metrics}} for r in table]
    dominated = frontier(rows, metrics)
    print("| run | " + " | ".join(metrics) + " | on the frontier | dominated by |")
    print("|---|" + "---|" * (len(metrics) + 2))
    for r in rows:
        figures = " | ".join(f"{r[m.lstrip('-')]:.3f}" for m in metrics)
        by = dominated[str(r["run"])]
        print(f"| {r['run']} | {figures} | {'yes' if not by else 'no'} | {', '.join(by)} |")


if __name__ == "__main__":
    main()
