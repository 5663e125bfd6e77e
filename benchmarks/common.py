"""Helpers shared by the benchmark scripts: machine description, timing, peak RSS, tables."""

from __future__ import annotations

import os
import platform
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("WSI_SCAAT_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))


def machine() -> str:
    """One line naming the machine the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} cores, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def timed(func: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - t0)
    return best, result


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


SECTION = re.compile(r"<!-- bench:(?P<name>\w+):begin -->\n.*?\n<!-- bench:(?P=name):end -->", re.S)


def section_block(name: str, text: str) -> str:
    """A benchmark's own section of docs/benchmarks.md, between markers that ``run_all`` keeps."""
    return f"<!-- bench:{name}:begin -->\n{text.strip()}\n<!-- bench:{name}:end -->"


def read_sections(text: str) -> dict[str, str]:
    """The marked sections (whole blocks, markers included) of a document, by benchmark name."""
    return {m["name"]: m[0] for m in SECTION.finditer(text)}


def write_section(doc: Path, name: str, text: str) -> None:
    """Replace benchmark ``name``'s section of ``doc`` (or append it), leaving the rest as it was."""
    old = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = section_block(name, text)
    sections = read_sections(old)
    new = old.replace(sections[name], block) if name in sections else old.rstrip() + "\n\n" + block + "\n"
    doc.write_text(new, encoding="utf-8")
