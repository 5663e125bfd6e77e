"""Atomic outputs: write under a temporary name next to the target, rename when complete.

A killed run leaves at most a hidden ``.<name>.tmp-<pid>`` behind, never a half-written file
under the final name; the next write of that output deletes it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TEMP_SUFFIX = re.compile(r"\.(?:tmp|old)-(\d+)$")


def temp_path_for(final: Path) -> Path:
    """Hidden temporary sibling of ``final`` (same folder, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_temps(final: Path) -> list[Path]:
    """Hidden temporaries of ``final`` whose processes no longer run (a killed run's).

    ``.<name>.tmp-<pid>`` and ``.<name>.old-<pid>``, and temporaries of those (an atomic output
    written through another one, e.g. ``..<name>.tmp-<pid>.tmp-<pid>``).
    """
    final = Path(final)
    stale = []
    for path in final.parent.glob(f".*{glob.escape(final.name)}.*-*"):
        name, pids = path.name, []
        while name != final.name and (match := _TEMP_SUFFIX.search(name)) and name.startswith("."):
            pids.append(int(match.group(1)))
            name = name[1 : match.start()]
        if name == final.name and pids and not any(_alive(pid) for pid in pids):
            stale.append(path)
    return stale


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
    for path in [tmp, *stale_temps(final)]:  # this process's, and those of killed runs
        _remove(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    commit(tmp, final)


def link_or_copy(src: str | Path, final: str | Path) -> None:
    """Atomically make ``final`` a copy of the file ``src``: a hard link where the filesystem allows."""
    with atomic_output(final) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def write_text(final: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_output(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(final: str | Path, obj: Any, indent: int | None = None) -> None:
    """Atomically write a JSON document."""
    write_text(final, json.dumps(obj, indent=indent) + "\n")
