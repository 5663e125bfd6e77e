"""Config and manifest validation: bad values stop before any work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsi_scaat.config import load_config, validate_config
from wsi_scaat.errors import ConfigError
from wsi_scaat.manifest import ManifestError, read_manifest

from conftest import REPO

BASE = {"cohort": {"name": "c", "manifest": "m.csv"}}


def test_shipped_configs_load() -> None:
    default = load_config(REPO / "configs" / "default.yaml")
    demo = load_config(REPO / "configs" / "default.yaml", REPO / "configs" / "demo.yaml")
    assert default.tiling.patch_size == 256 and default.tiling.target_mpp == 0.5
    assert demo.cohort.name == "demo" and demo.synth is not None
    assert demo.results == Path("results/demo")


@pytest.mark.parametrize(
    ("override", "key", "why"),
    [
        ({"tiling": {"patch_sise": 64}}, "tiling.patch_sise", "unknown key"),
        ({"colour": 1}, "colour", "unknown key"),
        ({"tiling": {"patch_size": "big"}}, "tiling.patch_size", "integer"),
        ({"tiling": {"min_tissue": 1.5}}, "tiling.min_tissue", "less than or equal to 1"),
        ({"tiling": {"format": "tif"}}, "tiling.format", "'h5' or 'zarr'"),
        ({"tiling": {"patch_size": 64, "overlap": 64}}, "tiling.overlap", "smaller than patch_size"),
        (
            {"tiling": {"patch_size": 64}, "saliency": {"overlap": 64}},
            "saliency.overlap",
            "below tiling.patch_size",
        ),
        ({"cohort": {"name": "../x", "manifest": "m.csv"}}, "cohort.name", "names a folder"),
    ],
)
def test_bad_values_name_the_key(override: dict, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config({**BASE, **override}, source="c.yaml")
    msg = str(err.value)
    assert msg.startswith("c.yaml: invalid configuration") and key in msg and why in msg


def test_yaml_files_merge_like_snakemake(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({**BASE, "tiling": {"patch_size": 128}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"tiling": {"min_tissue": 0.1}}))
    cfg = load_config(tmp_path / "a.yaml", tmp_path / "b.yaml")
    assert (cfg.tiling.patch_size, cfg.tiling.min_tissue) == (128, 0.1)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_manifest_resolves_paths(tmp_path: Path) -> None:
    header = "slide_id,path,split,label,annotations,mpp\n"
    path = _write(tmp_path, header + "a,slides/a.tiff,train,1,ann/a.geojson,\nb,/abs/b.svs,test,,,0.25\n")
    a, b = read_manifest(path)
    assert a.path == tmp_path / "slides" / "a.tiff" and a.annotations == tmp_path / "ann" / "a.geojson"
    assert (a.label, a.mpp, b.label, b.mpp, b.annotations) == (1, None, None, 0.25, None)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("slide_id,path,split\n", "missing columns"),
        ("slide_id,path,split,label,annotations\na,x,train,0,\na,y,train,0,\n", "row 3: duplicate"),
        ("slide_id,path,split,label,annotations\n../../x,x,train,0,\n", "unsafe slide_id"),
        ("slide_id,path,split,label,annotations\na,x,training,0,\n", "split must be"),
        ("slide_id,path,split,label,annotations,mpp\na,x,train,0,,-1\n", "mpp must be"),
    ],
)
def test_bad_manifests(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(ManifestError, match=why):
        read_manifest(_write(tmp_path, text))


def test_named_runs_override_train_settings() -> None:
    base = load_config(REPO / "configs/demo.yaml")
    runs = {"scaat_mr0.8": {"method": "scaat", "scaat": {"mask_ratio": 0.8}, "epochs": 2}}
    data = base.model_dump(mode="json")
    cfg = validate_config({**data, "train": {**data["train"], "runs": runs}})
    assert cfg.models == ["erm", "scaat", "scaat_mr0.8"]
    method, run = cfg.training_run("scaat_mr0.8")
    assert method == "scaat" and run.train.scaat.mask_ratio == 0.8 and run.train.epochs == 2
    assert run.train.scaat.eps == base.train.scaat.eps  # untouched knobs keep the base value
    assert cfg.training_run("erm") == ("erm", cfg)
    sweep = load_config(REPO / "configs/demo.yaml", REPO / "configs/hard.yaml", REPO / "configs/sweep.yaml")
    assert sweep.cohort.name == "hard" and {sweep.training_run(m)[0] for m in sweep.models} == {
        "erm", "scaat", "advgrad", "sgt"}  # fmt: skip
    # 3 seeds for ERM and each method's (and advgrad variant's) default strength, 1 for the 10 others
    assert len(sweep.models) == 6 * 3 + 10
    variants = {
        sweep.training_run(m)[1].train.advgrad.variant for m in sweep.models if m.startswith("advgrad")
    }
    assert variants == {"l1", "elastic", "group"}


def test_model_identity_leaves_other_models_alone() -> None:
    """A model's training settings (the train rule's param, the resume hash) ignore other runs and other
    methods' knobs: adding a run or changing SCAAT's knobs does not re-train ERM."""
    base = load_config(REPO / "configs/demo.yaml").train
    more = base.model_copy(update={"runs": {"scaat_eps0.2": {"method": "scaat", "scaat": {"eps": 0.2}}}})
    other = base.model_copy(update={"scaat": base.scaat.model_copy(update={"eps": 0.3})})
    assert base.identity("erm") == more.identity("erm") == other.identity("erm")
    assert base.identity("scaat") == more.identity("scaat") != other.identity("scaat")
    assert "scaat" not in base.identity("erm") and "runs" not in base.identity("scaat")
    assert "max_open_stores" not in base.identity("erm", frozenset({"max_open_stores"}))


@pytest.mark.parametrize(
    ("runs", "why"),
    [
        ({"x": {"scaat": {"mask_ratio": 0.8}}}, "'method' must be one of"),
        ({"x": {"method": "scaat", "scaat": {"mask_rat": 0.8}}}, "scaat.mask_rat: unknown key"),
        ({"x": {"method": "scaat", "scaat": {"mask_ratio": 2}}}, "scaat.mask_ratio"),
        ({"scaat": {"method": "scaat"}}, "not a method name"),
        ({"../x": {"method": "erm"}}, "run name"),
        ({"x": {"method": "erm", "runs": {}}}, "cannot be overridden"),
    ],
)
def test_bad_runs_name_the_run(runs: dict, why: str) -> None:
    with pytest.raises(ConfigError, match=why.replace(".", r"\.").replace("(", r"\(")):
        validate_config({"cohort": {"name": "c", "manifest": "m.csv"}, "train": {"runs": runs}})
    with pytest.raises(ConfigError, match="neither a method"):
        validate_config({"cohort": {"name": "c", "manifest": "m.csv"}}).training_run("nope")


def test_seeds_name_the_models_and_set_the_training_seed() -> None:
    cfg = validate_config(
        {
            "cohort": {"name": "c", "manifest": "m.csv"},
            "train": {"methods": ["erm", "scaat"], "seed": 10,
                      "runs": {"sgt_weak": {"method": "sgt", "sgt": {"mask_fraction": 0.3}, "seeds": 1}}},
            "evaluate": {"seeds": 3},
        }
    )  # fmt: skip
    assert cfg.runs == ["erm", "scaat", "sgt_weak"]
    assert cfg.models == ["erm", "erm.s11", "erm.s12", "scaat", "scaat.s11", "scaat.s12", "sgt_weak"]
    assert cfg.replicates("scaat") == ["scaat", "scaat.s11", "scaat.s12"]
    assert cfg.run_of("scaat.s12") == ("scaat", 12) and cfg.run_of("erm") == ("erm", 10)
    method, run_cfg = cfg.training_run("scaat.s12")
    assert method == "scaat" and run_cfg.train.seed == 12 and cfg.train.seed == 10
    method, run_cfg = cfg.training_run("sgt_weak")
    assert method == "sgt" and run_cfg.train.sgt.mask_fraction == 0.3 and run_cfg.train.seed == 10
    assert cfg.training_run("erm")[1] is cfg
    with pytest.raises(ConfigError, match="unknown model 'erm.s13'"):
        cfg.run_of("erm.s13")


def test_run_seeds_must_be_a_count() -> None:
    data = {"cohort": {"name": "c", "manifest": "m.csv"},
            "train": {"runs": {"x": {"method": "scaat", "seeds": 0}}}}  # fmt: skip
    with pytest.raises(ConfigError, match="'seeds' must be an integer from 1 to 100"):
        validate_config(data)


def test_config_and_cli_import_without_torch() -> None:
    """Validating a config (every Snakemake process, every job) and the CLI's defaults need no torch."""
    import subprocess
    import sys

    code = (
        "import sys, wsi_scaat.config, wsi_scaat.cli, wsi_scaat.run_summary, wsi_scaat.manifest; "
        "print(sorted(m for m in ('torch', 'albumentations', 'cv2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
