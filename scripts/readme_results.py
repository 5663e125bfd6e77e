"""Put the demo's evaluation table (``results/demo/evaluation/metrics.md``) into README.md, between
the markers ``<!-- evaluation:begin -->`` and ``<!-- evaluation:end -->``; run by ``make demo``."""

from __future__ import annotations

import sys
from pathlib import Path

BEGIN, END = "<!-- evaluation:begin -->", "<!-- evaluation:end -->"


def include(table: Path, readme: Path) -> bool:
    """Replace the text between the markers of ``readme`` with ``table``'s; True when it changed."""
    text = readme.read_text(encoding="utf-8")
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{readme}: markers {BEGIN} ... {END} not found")
    new = f"{head}{BEGIN}\n{table.read_text(encoding='utf-8').strip()}\n{END}{tail}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    args = sys.argv[1:] or ["results/demo/evaluation/metrics.md", "README.md"]
    if len(args) != 2:
        raise SystemExit("usage: readme_results.py [METRICS_MD README_MD]")
    table, readme = Path(args[0]), Path(args[1])
    print(f"{readme}: evaluation table {'updated' if include(table, readme) else 'unchanged'} from {table}")
