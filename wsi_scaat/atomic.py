"""Atomic outputs: write under a temporary name next to the target, rename when complete.

A killed run leaves at most a hidden ``.<name>.tmp-<pid>`` behind, never a half-written file
under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_path_for(final: Path) -> Path:
    """Hidden temporary sibling of ``final`` (same folder, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` (file or folder) to ``final``, replacing any previous output."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir() and final.exists():
        # os.replace cannot overwrite a non-empty folder: move the old one aside first.
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_output(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to ``final``, on error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    commit(tmp, final)


def write_text(final: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_output(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(final: str | Path, obj: Any, indent: int | None = None) -> None:
    """Atomically write a JSON document."""
    write_text(final, json.dumps(obj, indent=indent) + "\n")
