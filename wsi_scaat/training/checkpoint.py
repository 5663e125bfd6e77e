"""Checkpoints: one self-describing dict, saved atomically, loaded with ``weights_only=True``.

Keys: ``format``, ``version``, ``model`` (state dict), ``optimizer``, ``scheduler``, ``scaler``,
``epoch`` (epochs completed), ``best_metric``, ``best_epoch``, ``history`` (per-epoch metrics),
``method``, ``config`` (the resolved configuration), ``train_hash`` (what must match to resume),
``class_names``, ``normalization`` (mean, std of the inputs in [0, 1]), ``patch_size``,
``patch_mpp``, ``wsi_scaat_version``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from wsi_scaat.atomic import atomic_output
from wsi_scaat.errors import WsiScaatError

FORMAT = "wsi-scaat-checkpoint"
VERSION = 1


class CheckpointError(WsiScaatError):
    """A checkpoint is missing, unreadable or not a wsi-scaat checkpoint."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_output(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code from the file is ever run)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(path, f"cannot load checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(path, "not a wsi-scaat checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(path, f"checkpoint version {state['version']} is newer than this wsi-scaat")
    return state


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (e.g. the train section of the config)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
