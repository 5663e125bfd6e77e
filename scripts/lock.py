"""Refresh requirements.lock: the whole environment pinned for Python 3.11 on Linux x86-64.

Run by `make lock`. uv resolves pyproject.toml with every extra; then `opencv-python` and
`opencv-python-headless` are pinned to one version (tiatoolbox needs the first, albumentations
the second, and both install the same `cv2` files, so two versions would overwrite each other)
and the lock is resolved again with that pin. The lock is used as pip constraints by
`make install`, so a package released after this lock cannot change a fresh install.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
EXTRAS = ("dev", "cluster")
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
OPENCV = ("opencv-python", "opencv-python-headless")


def compile_lock(uv: str, out: Path, constraints: Path | None = None) -> None:
    """Resolve pyproject.toml with uv into `out`."""
    cmd = [uv, "pip", "compile", "pyproject.toml", "--python-version", PYTHON]
    cmd += ["--python-platform", PLATFORM, "--quiet", "--custom-compile-command", "make lock"]
    cmd += ["-o", str(out)]
    for extra in EXTRAS:
        cmd += ["--extra", extra]
    if constraints is not None:
        cmd += ["-c", str(constraints)]
    subprocess.run(cmd, cwd=ROOT, check=True)


def pins(lock: Path) -> dict[str, str]:
    """Package name -> pinned version of a compiled lock."""
    found = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock.read_text(), flags=re.MULTILINE)
    return {name.lower(): version for name, version in found}


def main(uv: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        first = Path(tmp) / "first.lock"
        compile_lock(uv, first)
        versions = pins(first)
        # The lower of the two versions satisfies both dependants (tiatoolbox caps opencv-python).
        opencv = min((versions[name] for name in OPENCV), key=lambda v: tuple(map(int, v.split("."))))
        constraints = Path(tmp) / "opencv.txt"
        constraints.write_text("".join(f"{name}=={opencv}\n" for name in OPENCV))
        compile_lock(uv, first, constraints)
        text = first.read_text().replace(str(constraints), "opencv pair (scripts/lock.py)")
    LOCK.write_text(text)
    final = pins(LOCK)
    if len({final[name] for name in OPENCV}) != 1:
        print(f"lock: {OPENCV} differ: {[final[n] for n in OPENCV]}", file=sys.stderr)
        return 1
    print(f"lock: {len(final)} packages pinned in {LOCK.name}; opencv pair at {opencv}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "uv"))
