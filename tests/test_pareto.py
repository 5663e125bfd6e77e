"""scripts/pareto_frontier.py: which runs no other run beats on every metric."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from pareto_frontier import frontier  # noqa: E402


def test_frontier_names_the_dominating_runs() -> None:
    rows = [
        {"run": "erm", "acc": 0.90, "gap": 0.00, "loc": 0.60},
        {"run": "a", "acc": 0.90, "gap": 0.10, "loc": 0.60},  # beats erm on gap, ties the rest
        {"run": "b", "acc": 0.85, "gap": 0.20, "loc": 0.55},  # best gap, worse elsewhere: a trade-off
        {"run": "c", "acc": 0.80, "gap": 0.05, "loc": 0.50},  # beaten by a and b
        {"run": "d", "acc": 0.90, "gap": 0.10, "loc": 0.60},  # equal to a: neither dominates
    ]
    by = frontier(rows, ["acc", "gap", "loc"])
    assert by == {"erm": ["a", "d"], "a": [], "b": [], "c": ["a", "b", "d"], "d": []}


def test_lower_is_better_metrics_are_negated() -> None:
    rows = [{"run": "x", "deletion": 0.2, "acc": 0.9}, {"run": "y", "deletion": 0.1, "acc": 0.9}]
    assert frontier(rows, ["-deletion", "acc"]) == {"x": ["y"], "y": []}
    assert frontier(rows, ["deletion", "acc"]) == {"x": [], "y": ["x"]}
