"""Compare the results folders of two runs of the workflow (e.g. through SLURM and locally).

    python tests/cluster/compare_outputs.py RESULTS_A RESULTS_B

Both folders must hold the same files. Every file must be byte-identical, except:
  - logs/, benchmarks/ and config.yaml: skipped (timings, paths of the run);
  - checkpoints (*.pt), JSON and CSV files: equal content, floats within a relative tolerance of
    1e-5, wall-clock timings (entries and columns named `seconds`) ignored;
  - HDF5 patch stores (*.h5): equal datasets and attributes (the file bytes may differ);
  - TIFF files: equal pixels and tags, the random UUID of the OME-XML ignored.
Paths written into outputs (e.g. the checkpoint a saliency map was made with) must match too:
give both runs the same relative results_dir, each in its own working directory.
Exit status 1, with the differences listed, when they differ.
"""

from __future__ import annotations

import argparse
import collections
import csv
import filecmp
import json
import math
import re
import sys
from pathlib import Path

SKIPPED_DIRS = ("logs", "benchmarks")
SKIPPED_FILES = ("config.yaml",)
RTOL, ATOL = 1e-5, 1e-7
VOLATILE_KEYS = {"seconds"}  # wall-clock timings: differ from run to run
TENSORS = collections.Counter()  # checkpoint tensors compared: "bitwise" equal or only "close"


def _files(root: Path) -> set[str]:
    out = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] not in SKIPPED_DIRS and rel.as_posix() not in SKIPPED_FILES:
            out.add(rel.as_posix())
    return out


def _same_tree(a, b, where: str, errors: list[str]) -> None:
    """Nested content: tensors and floats within tolerance, timings ignored, everything else equal."""
    torch = sys.modules.get("torch")  # imported by _compare_checkpoint; tensors only come from there
    if torch is not None and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            errors.append(f"{where}: {tuple(a.shape)} {a.dtype} != {tuple(b.shape)} {b.dtype}")
        elif torch.equal(a, b):
            TENSORS["bitwise"] += 1
        elif a.is_floating_point():
            TENSORS["close"] += 1
            if not torch.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True):
                diff = (a.double() - b.double()).abs().max().item()
                errors.append(f"{where}: max difference {diff:.3g}")
        elif not torch.equal(a, b):
            errors.append(f"{where}: integer tensors differ")
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            errors.append(f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} in one only")
        for key in sorted(set(a) & set(b) - VOLATILE_KEYS, key=str):
            _same_tree(a[key], b[key], f"{where}.{key}", errors)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_tree(x, y, f"{where}[{i}]", errors)
    elif isinstance(a, float) and isinstance(b, float):
        if not math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL) and not (math.isnan(a) and math.isnan(b)):
            errors.append(f"{where}: {a!r} != {b!r}")
    elif a != b:
        errors.append(f"{where}: {a!r} != {b!r}")


def _compare_checkpoint(a: Path, b: Path) -> list[str]:
    import torch

    errors: list[str] = []
    _same_tree(torch.load(a, map_location="cpu"), torch.load(b, map_location="cpu"), "", errors)
    return errors


def _compare_json(a: Path, b: Path) -> list[str]:
    errors: list[str] = []
    _same_tree(json.loads(a.read_text()), json.loads(b.read_text()), "", errors)
    return errors


def _compare_csv(a: Path, b: Path) -> list[str]:
    def rows(path: Path) -> list[dict]:
        with open(path, newline="") as f:
            return [
                {k: _number(v) for k, v in row.items() if k not in VOLATILE_KEYS} for row in csv.DictReader(f)
            ]

    errors: list[str] = []
    _same_tree(rows(a), rows(b), "", errors)
    return errors


def _number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _compare_tiff(a: Path, b: Path) -> list[str]:
    import numpy as np
    import tifffile

    def tags(page) -> dict:
        out = {}
        for tag in page.tags.values():
            value = tag.value
            if tag.name == "ImageDescription" and isinstance(value, str):
                value = re.sub(r'UUID="urn:uuid:[0-9a-f-]+"', 'UUID=""', value)
            if tag.name not in ("StripOffsets", "TileOffsets", "SubIFDs"):  # byte layout only
                out[tag.name] = value
        return out

    errors: list[str] = []
    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        pages_a, pages_b = list(ta.pages), list(tb.pages)
        for level in ta.series[0].levels[1:] if ta.series else []:
            pages_a += [p for p in level.pages if p is not None]
        for level in tb.series[0].levels[1:] if tb.series else []:
            pages_b += [p for p in level.pages if p is not None]
        if len(pages_a) != len(pages_b):
            return [f"{len(pages_a)} != {len(pages_b)} pages"]
        for i, (pa, pb) in enumerate(zip(pages_a, pages_b, strict=True)):
            if tags(pa) != tags(pb):
                errors.append(f"page {i}: tags differ")
            if not np.array_equal(pa.asarray(), pb.asarray()):
                errors.append(f"page {i}: pixels differ")
    return errors


def _compare_h5(a: Path, b: Path) -> list[str]:
    import h5py
    import hdf5plugin  # noqa: F401  (the stores' compression filters)
    import numpy as np

    errors: list[str] = []

    def attrs(obj) -> dict:
        return {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        if sorted(names_a) != sorted(names_b):
            return [f"objects {sorted(set(names_a) ^ set(names_b))} in one only"]
        if attrs(fa) != attrs(fb):
            errors.append("root attributes differ")
        for name in names_a:
            oa, ob = fa[name], fb[name]
            if attrs(oa) != attrs(ob):
                errors.append(f"{name}: attributes differ")
            if isinstance(oa, h5py.Dataset) and not np.array_equal(
                oa[()], ob[()], equal_nan=oa.dtype.kind == "f"
            ):
                errors.append(f"{name}: data differ")
    return errors


def compare(root_a: Path, root_b: Path) -> int:
    files_a, files_b = _files(root_a), _files(root_b)
    problems: list[str] = [f"only in {root_a}: {p}" for p in sorted(files_a - files_b)]
    problems += [f"only in {root_b}: {p}" for p in sorted(files_b - files_a)]
    identical, close = 0, []
    for rel in sorted(files_a & files_b):
        a, b = root_a / rel, root_b / rel
        if filecmp.cmp(a, b, shallow=False):
            identical += 1
            continue
        compare_content = {
            ".pt": _compare_checkpoint,
            ".h5": _compare_h5,
            ".json": _compare_json,
            ".csv": _compare_csv,
            ".tif": _compare_tiff,
            ".tiff": _compare_tiff,
        }.get(a.suffix)
        errors = compare_content(a, b) if compare_content is not None else ["bytes differ"]
        if errors:
            problems += [f"{rel}: {e}" for e in errors]
        else:
            close.append(rel)
    kinds = collections.Counter(Path(rel).suffix or Path(rel).name for rel in close)
    print(
        f"compare: {len(files_a | files_b)} files; {identical} byte-identical, {len(close)} equal in content"
        f" ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or 'none'}); {len(problems)} differences"
    )
    if TENSORS:
        print(
            f"compare: checkpoint tensors: {TENSORS['bitwise']} bitwise equal, {TENSORS['close']} not bitwise"
            f" (equal within rtol={RTOL:g} unless listed below)"
        )
    for line in problems[:50]:
        print(f"  DIFFERS {line}")
    return 1 if problems or not files_a else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_a", type=Path)
    parser.add_argument("results_b", type=Path)
    args = parser.parse_args()
    sys.exit(compare(args.results_a, args.results_b))


if __name__ == "__main__":
    main()
