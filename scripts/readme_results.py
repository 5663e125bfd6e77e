"""Put the demo's evaluation table (``results/demo/evaluation/metrics.md``) into README.md, between
the markers ``<!-- evaluation:begin -->`` and ``<!-- evaluation:end -->``; run by ``make demo``.

A third argument NAME selects the markers ``<!-- evaluation:NAME:begin -->`` and
``<!-- evaluation:NAME:end -->`` instead: several tables in one file (``make real`` writes the
``wsss4luad`` table of docs/evaluation.md)."""

from __future__ import annotations

import sys
from pathlib import Path

BEGIN, END = "<!-- evaluation:begin -->", "<!-- evaluation:end -->"


def markers(name: str | None = None) -> tuple[str, str]:
    """The begin and end markers of the table ``name`` (None: the default pair)."""
    if not name:
        return BEGIN, END
    return f"<!-- evaluation:{name}:begin -->", f"<!-- evaluation:{name}:end -->"


def include(table: Path, readme: Path, name: str | None = None) -> bool:
    """Replace the text between the markers of ``readme`` with ``table``'s; True when it changed."""
    begin, end = markers(name)
    text = readme.read_text(encoding="utf-8")
    head, sep, rest = text.partition(begin)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise SystemExit(f"{readme}: markers {begin} ... {end} not found")
    new = f"{head}{begin}\n{table.read_text(encoding='utf-8').strip()}\n{end}{tail}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    args = sys.argv[1:] or ["results/demo/evaluation/metrics.md", "README.md"]
    if len(args) not in (2, 3):
        raise SystemExit("usage: readme_results.py [METRICS_MD README_MD [NAME]]")
    table, readme, name = Path(args[0]), Path(args[1]), args[2] if len(args) == 3 else None
    changed = include(table, readme, name)
    print(f"{readme}: evaluation table {'updated' if changed else 'unchanged'} from {table}")
