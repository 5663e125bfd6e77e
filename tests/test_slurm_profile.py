"""The SLURM profile's job groups: one SLURM job per slide (or per batch of slides), as Snakemake forms them.

The profile (configs/profiles/slurm/config.yaml) is a YTE template read with the environment; its
``groups`` and ``group-components`` are given to a dry run of the workflow (groups are formed in
dry runs and remote runs only), which lists the group jobs it would submit. The SLURM run itself is
``tests/cluster/run_slurm.sh``.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PROFILE = REPO / "configs" / "profiles" / "slurm" / "config.yaml"
RULE = re.compile(r"rule (\w+):")


def _profile(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict:
    yte = pytest.importorskip("yte")
    for key in ("WSI_SCAAT_SLURM_SLIDES_PER_JOB", "WSI_SCAAT_SLURM_GPUS", "WSI_SCAAT_SLURM_GPU_MODEL",
                "WSI_SCAAT_SLURM_GPU_PARTITION", "WSI_SCAAT_SLURM_PARTITION"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with PROFILE.open() as fh:
        return yte.process_yaml(fh, require_use_yte=True)


def test_profile_groups_per_slide_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _profile(monkeypatch, WSI_SCAAT_SLURM_GPU_MODEL="a100", WSI_SCAAT_SLURM_GPU_PARTITION="gpu")
    assert p["groups"] == {"saliency": "slide_{slide}", "stitch": "slide_{slide}", "export": "slide_{slide}"}
    assert p["group-components"] == {"slide_{slide}": 1000}
    assert p["resources"] == {"mem_mb": 16000, "gpu": 1} and p["set-resource-scopes"] == {"gpu": "local"}
    assert p["keep-incomplete"] is True  # a failed group job keeps what its finished stages wrote
    res = p["set-resources"]
    for rule in ("stitch", "export"):  # one group job has one partition and GPU type
        assert (res[rule]["slurm_partition"], res[rule]["gpu_model"]) == (
            res["saliency"]["slurm_partition"], res["saliency"]["gpu_model"])  # fmt: skip
    memory = max(res[rule]["mem_mb"] for rule in ("saliency", "stitch", "export"))
    assert memory <= p["resources"]["mem_mb"]  # every grouped job fits a group job's limit


def test_profile_batches_and_no_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _profile(monkeypatch, WSI_SCAAT_SLURM_SLIDES_PER_JOB="4", WSI_SCAAT_SLURM_GPUS="0")
    # tiling is never grouped: a broken slide fails its own tiling job alone
    assert p["groups"] == {rule: "slides_{model}" for rule in ("saliency", "stitch", "export")}
    assert p["group-components"] == {"slides_{model}": 4}
    assert p["resources"] == {"mem_mb": 16000}  # no GPU limit on a cluster without GPUs
    p = _profile(monkeypatch, WSI_SCAAT_SLURM_SLIDES_PER_JOB="0")
    assert not {"groups", "group-components", "resources", "set-resource-scopes"} & set(p)


def _group_jobs(profile: dict, tmp_path: Path, n_slides: int) -> collections.Counter[str]:
    """The group jobs a dry run forms for a cohort of ``n_slides`` (files absent: nothing runs)."""
    rows = ["slide_id,path,split,label,annotations"]
    rows += [f"s{i},s{i}.tiff,{('train', 'val', 'test')[i % 3]},{i % 2}," for i in range(n_slides)]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = {"cohort": {"name": "c", "manifest": str(tmp_path / "manifest.csv")},
           "results_dir": str(tmp_path / "results"), "train": {"methods": ["erm", "scaat"]}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = ["--groups", *(f"{r}={g}" for r, g in profile["groups"].items())]
    args += ["--group-components", *(f"{g}={n}" for g, n in profile["group-components"].items())]
    args += ["--resources", *(f"{r}={n}" for r, n in profile["resources"].items())]
    args += ["--set-resource-scopes", *(f"{r}={s}" for r, s in profile["set-resource-scopes"].items())]
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"), "--directory",
           str(tmp_path), *args, "--configfile", str(tmp_path / "config.yaml")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    found: collections.Counter[str] = collections.Counter()
    for name, jobs in re.findall(r"Group job (\S+) \(jobs in lexicogr. order\):((?:\n(?!\[|\S).*)*)", out):
        found[f"{name}: {' '.join(sorted(set(re.findall(RULE, jobs))))}"] += 1
    return found


def test_dry_run_forms_one_group_job_per_slide(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    groups = _group_jobs(_profile(monkeypatch), tmp_path, 5)
    assert groups == {f"slide_s{i}: export saliency stitch": 1 for i in range(5)}


def test_dry_run_forms_batches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    groups = _group_jobs(_profile(monkeypatch, WSI_SCAAT_SLURM_SLIDES_PER_JOB="2"), tmp_path, 5)
    # 5 slides in batches of 2: per model 3 jobs of saliency + stitch + export (tiling not grouped)
    assert groups == {"slides_erm: export saliency stitch": 3, "slides_scaat: export saliency stitch": 3}
