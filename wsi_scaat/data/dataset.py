"""Patch datasets over patch stores, and seeded DataLoaders whose epochs are reproducible.

Determinism and resume
----------------------
``make_loader`` returns a :class:`SeededLoader` whose sampler is an :class:`EpochSampler`. Everything
random in epoch ``e`` is a function of ``(seed, e)`` only:

* the index order (shuffled or class-balanced) is drawn from a generator seeded with ``(seed, e)``;
* the loader's ``generator`` is re-seeded from ``(seed, e)`` when an epoch starts, so the per-worker
  seeds that PyTorch derives from it are too; ``seed_worker`` then seeds ``numpy``/``random`` and
  the dataset's transform in each worker (workers are not persistent: they restart every epoch);
* with ``num_workers=0`` the dataset's transform is re-seeded from ``(seed, e)`` instead;
* a training loader over a :class:`PatchDataset` goes further: its sampler hands out
  ``(index, sample_seed)`` items and the transform is re-seeded per item, from ``(seed, e, position
  in the epoch)``, so each sample's augmentation depends neither on the workers nor on which
  process loads it.

The epoch counter lives in the sampler and advances by one each time an epoch's iteration starts, so
a plain ``for epoch ...: for batch in loader`` loop sees epochs 0, 1, 2... A resumed run calls
``loader.set_epoch(start_epoch)`` (same as ``loader.sampler.set_epoch``) once before its first epoch,
or before every epoch, and then sees exactly the batches of an uninterrupted run. Augmented pixels are
also identical as long as ``num_workers`` is unchanged (batches go round-robin to the workers), or
whatever it is with per-item seeds.

Data-parallel training
----------------------
``make_loader(..., rank=r, world_size=N)`` keeps ``batch_size`` as the *global* batch: every rank
draws the same epoch order and a training loader yields rank ``r``'s contiguous ``batch_size / N``
of each global batch, so the union of the ranks' batches of a step is the single-process batch; an
evaluation loader gives rank ``r`` a contiguous block of whole batches (concatenated in rank order,
the ranks' predictions are the single-process ones).
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from wsi_scaat.errors import StoreError
from wsi_scaat.manifest import read_manifest
from wsi_scaat.store import PatchStore, open_store, store_suffix

SPLITS = ("train", "val", "test")
_ORDER, _WORKERS, _MAIN, _ITEMS = 0, 1, 2, 3  # streams derived from one seed


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed hashed from ``seed`` and ``keys`` (unlike ``seed + epoch``, runs never share streams)."""
    words = np.random.SeedSequence([seed % 2**64, *(k % 2**64 for k in keys)]).generate_state(2)
    return (int(words[0]) << 31) ^ int(words[1])


class PatchDataset(Dataset):
    """Patches of several stores: item ``i`` is ``(float32 (3, P, P) image in [0, 1], int64 label)``.

    The index table (``store_index``, ``patch_index``, ``labels``) is read at construction, then the
    stores are closed; ``store_attrs`` keeps the first store's attributes. No stores (an empty split)
    gives an empty dataset whose ``patch_size`` is None. Patches are read lazily: every process opens
    its own handles on first use (so any DataLoader worker start method works), at most ``max_open``.
    ``label_source="store"`` takes each store's ``labels`` array, ``"slide"`` gives every patch its
    slide's label from ``slide_labels``. ``transform`` maps a (P, P, 3) uint8 patch to another one;
    if it has ``reseed(seed)`` (see ``build_augment``), loaders use it to make augmentation reproducible.
    An item may also be fetched as ``dataset[(i, seed)]``: the transform is re-seeded from ``seed``
    first (what a keyed :class:`EpochSampler` yields). ``ignore_band=(low, high)`` leaves out the
    patches whose stored ``lesion_fraction`` f has ``low < f < high`` (mixed patches, whose label is
    ambiguous; ``n_ignored`` counts them).
    """

    keyed_items: bool = True  # accepts (index, sample seed) items

    def __init__(
        self,
        stores: Sequence[Path],
        *,
        label_source: Literal["store", "slide"] = "store",
        slide_labels: Sequence[int | None] | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        max_open: int = 128,
        ignore_band: tuple[float, float] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in stores]
        if label_source not in ("store", "slide"):
            raise ValueError(f"label_source must be 'store' or 'slide', got {label_source!r}")
        if label_source == "slide":
            if slide_labels is None:
                raise ValueError("label_source='slide' needs slide_labels (one per store)")
            if len(slide_labels) != len(self.paths):
                raise ValueError(f"got {len(slide_labels)} slide_labels for {len(self.paths)} stores")
        self.label_source, self.transform, self.max_open = label_source, transform, max(1, max_open)
        sizes: list[int] = []
        labels: list[np.ndarray] = [np.zeros(0, np.int64)]
        kept: list[np.ndarray] = [np.zeros(0, np.int64)]
        totals: list[int] = []
        patch_size: int | None = None
        self.store_attrs: dict[str, Any] = {}
        for k, path in enumerate(self.paths):
            with open_store(path) as store:
                n, size = len(store), int(store.imgs.shape[1])
                totals.append(n)
                if patch_size is None:
                    patch_size, self.store_attrs = size, dict(store.attrs)
                elif size != patch_size:
                    raise StoreError(path, f"patch size {size} differs from {patch_size} of {self.paths[0]}")
                if label_source == "store":
                    if "labels" not in store:
                        raise StoreError(
                            path, "has no 'labels' array (tile with annotations, or use label_source='slide')"
                        )
                    lab = store.array("labels").astype(np.int64).reshape(-1)
                    if len(lab) != n:
                        raise StoreError(path, f"'labels' has {len(lab)} entries for {n} patches")
                else:
                    if slide_labels[k] is None:  # type: ignore[index]
                        raise StoreError(path, "slide has no label (label_source='slide')")
                    lab = np.full(n, int(slide_labels[k]), dtype=np.int64)  # type: ignore[index, arg-type]
                keep = np.arange(n, dtype=np.int64)
                if ignore_band is not None:
                    keep = keep[~_in_band(store, path, n, ignore_band)]
            sizes.append(len(keep))
            labels.append(lab[keep])
            kept.append(keep)
        self.patch_size: int | None = patch_size
        self.labels: np.ndarray = np.concatenate(labels)
        self.store_index: np.ndarray = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        self.patch_index: np.ndarray = np.concatenate(kept)
        self.n_ignored: int = sum(totals) - len(self.labels)
        self._handles: OrderedDict[int, PatchStore] = OrderedDict()
        self._pid: int | None = None

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[Path, int | None]], **kwargs: Any) -> PatchDataset:
        """A dataset over ``cohort_stores(...)[split]``: ``(store path, slide label)`` pairs."""
        return cls([p for p, _ in pairs], slide_labels=[lab for _, lab in pairs], **kwargs)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _store(self, k: int) -> PatchStore:
        if self._pid != os.getpid():  # new process: inherited handles are not ours to use
            self._handles, self._pid = OrderedDict(), os.getpid()
        store = self._handles.get(k)
        if store is None:
            while len(self._handles) >= self.max_open:
                self._handles.popitem(last=False)[1].close()
            store = self._handles[k] = open_store(self.paths[k])
        else:
            self._handles.move_to_end(k)
        return store

    def read(self, i: int) -> np.ndarray:
        """Patch ``i`` as stored: (P, P, 3) uint8, no transform."""
        return np.asarray(self._store(int(self.store_index[i])).imgs[int(self.patch_index[i])])

    def __getitem__(self, i: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(i, tuple):
            i, seed = i
            if self.transform is not None:
                self.reseed(seed)
        img = self.read(i)
        if self.transform is not None:
            img = self.transform(img)
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).to(torch.float32).div_(255.0)
        return x, torch.tensor(self.labels[i], dtype=torch.int64)

    def reseed(self, seed: int) -> None:
        """Re-seed the transform (when it supports it); loaders call this per epoch and worker."""
        reseed = getattr(self.transform, "reseed", None)
        if callable(reseed):
            reseed(seed)

    def close(self) -> None:
        """Close the handles this process opened."""
        if self._pid == os.getpid():
            for store in self._handles.values():
                store.close()
        self._handles = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": OrderedDict(), "_pid": None}


def _in_band(store: PatchStore, path: Path, n: int, band: tuple[float, float]) -> np.ndarray:
    """Patches of ``store`` whose lesion fraction lies strictly inside ``band``."""
    low, high = band
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"ignore band must have 0 <= low < high <= 1, got {band}")
    if "lesion_fraction" not in store:
        raise StoreError(path, "has no 'lesion_fraction' array for the ignore band (tile with annotations, "
                               "or set train.ignore_band: null)")  # fmt: skip
    fraction = store.array("lesion_fraction").astype(np.float32).reshape(-1)
    if len(fraction) != n:
        raise StoreError(path, f"'lesion_fraction' has {len(fraction)} entries for {n} patches")
    return (fraction > np.float32(low)) & (fraction < np.float32(high))  # bounds as stored: float32


def cohort_stores(
    manifest: Path, tiles_dir: Path, fmt: str = "h5", splits: Sequence[str] = SPLITS
) -> dict[str, list[tuple[Path, int | None]]]:
    """Split name -> ``[(store path, slide label)]`` in manifest order, for ``splits`` only.

    Splits are by slide, as the manifest assigns them. Every store of the requested splits must
    exist (the others may still be in the making, e.g. test slides while a model trains).
    """
    suffix = store_suffix(fmt)
    out: dict[str, list[tuple[Path, int | None]]] = {s: [] for s in splits}
    missing: list[Path] = []
    for entry in read_manifest(manifest):
        if entry.split not in out:
            continue
        path = Path(tiles_dir) / f"{entry.slide_id}{suffix}"
        if not path.exists():
            missing.append(path)
        out[entry.split].append((path, entry.label))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise StoreError(missing[0], f"patch store not found{more}; tile the cohort first")
    return out


class EpochSampler(Sampler[int]):
    """Indices of one epoch, a pure function of ``(seed, epoch)``.

    ``mode``: ``"sequential"`` (0..n-1), ``"shuffle"`` (a permutation) or ``"balanced"`` (n draws with
    replacement, weights inversely proportional to class frequency, so every class is equally likely).
    ``iter()`` uses the current ``epoch`` and then advances it; ``set_epoch`` sets it (for resume).

    ``keyed``: yield ``(index, sample_seed)`` pairs, the seed drawn per position of the epoch.
    ``world_size`` > 1 cuts the epoch into global batches of ``batch_size`` and yields rank ``rank``'s
    share: in the training modes (shuffle, balanced) its contiguous ``batch_size / world_size`` items
    of every full batch (an incomplete last batch is dropped); in sequential mode (evaluation) a
    contiguous block of whole batches, the blocks of ranks 0, 1... following each other.
    """

    def __init__(
        self,
        n: int,
        mode: Literal["sequential", "shuffle", "balanced"] = "shuffle",
        *,
        seed: int = 0,
        labels: np.ndarray | None = None,
        keyed: bool = False,
        batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if mode not in ("sequential", "shuffle", "balanced"):
            raise ValueError(f"unknown sampler mode {mode!r}")
        if world_size > 1:
            if batch_size is None or (batch_size % world_size and mode != "sequential"):
                raise ValueError(
                    f"the global batch size ({batch_size}) must be a multiple of the number of processes "
                    f"({world_size})"
                )
            if not 0 <= rank < world_size:
                raise ValueError(f"rank {rank} out of range for {world_size} processes")
        self.n, self.mode, self.seed, self.epoch = int(n), mode, int(seed), 0
        self.keyed, self.batch_size = keyed, batch_size
        self.rank, self.world_size = int(rank), int(world_size)
        self.weights: np.ndarray | None = None
        if mode == "balanced":
            if labels is None or len(labels) != n:
                raise ValueError("balanced sampling needs one label per sample")
            _, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
            w = 1.0 / counts[inverse]
            self.weights = w / w.sum()

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch``."""
        self.epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The indices of epoch ``epoch`` (does not touch ``self.epoch``)."""
        if self.mode == "sequential" or self.n == 0:
            return np.arange(self.n)
        rng = np.random.default_rng(derive_seed(self.seed, _ORDER, epoch))
        if self.mode == "shuffle":
            return rng.permutation(self.n)
        return rng.choice(self.n, size=self.n, replace=True, p=self.weights)

    def sample_seeds(self, epoch: int) -> np.ndarray:
        """One seed per position of epoch ``epoch`` (what ``keyed`` pairs with the indices)."""
        rng = np.random.default_rng(derive_seed(self.seed, _ITEMS, epoch))
        return rng.integers(0, 2**63 - 1, size=self.n, dtype=np.int64)

    def _positions(self) -> np.ndarray:
        """Positions of the epoch this rank yields."""
        if self.world_size == 1 or self.batch_size is None:
            return np.arange(self.n)
        if self.mode == "sequential":
            batches = -(-self.n // self.batch_size)
            lo, hi = (min(self.n, r * batches // self.world_size * self.batch_size)
                      for r in (self.rank, self.rank + 1))  # fmt: skip
            return np.arange(lo, hi)
        local = self.batch_size // self.world_size
        starts = np.arange(self.n // self.batch_size) * self.batch_size + self.rank * local
        return (starts[:, None] + np.arange(local)).reshape(-1)

    def __iter__(self) -> Iterator[Any]:
        order, positions = self.order(self.epoch), self._positions()
        items: list[Any] = order[positions].tolist()
        if self.keyed:
            items = list(zip(items, self.sample_seeds(self.epoch)[positions].tolist(), strict=True))
        self.epoch += 1
        return iter(items)

    def __len__(self) -> int:
        return len(self._positions())


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy, ``random`` and the dataset's transform from the worker's torch seed."""
    seed = torch.initial_seed()  # base seed (drawn from the loader's generator) + worker_id
    np.random.seed(seed % 2**32)
    random.seed(seed)
    info = get_worker_info()
    reseed = getattr(info.dataset, "reseed", None) if info is not None else None
    if callable(reseed):
        reseed(derive_seed(seed, _WORKERS))


class SeededLoader(DataLoader):
    """A DataLoader with an :class:`EpochSampler` whose epochs are reproducible (see module doc)."""

    sampler: EpochSampler

    def __init__(self, dataset: Dataset, *, seed: int, sampler: EpochSampler, **kwargs: Any) -> None:
        self.seed = int(seed)
        super().__init__(dataset, sampler=sampler, generator=torch.Generator(), **kwargs)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will produce."""
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch`` (call before iterating to resume)."""
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Any:
        epoch = self.sampler.epoch  # the sampler advances only when the epoch's first batch is drawn
        self.generator.manual_seed(derive_seed(self.seed, _WORKERS, epoch))
        if self.num_workers == 0:
            reseed = getattr(self.dataset, "reseed", None)
            if callable(reseed):
                reseed(derive_seed(self.seed, _MAIN, epoch))
        return super().__iter__()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    balance: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    multiprocessing_context: str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> SeededLoader:
    """A training (shuffled, or class-balanced with ``balance``) or evaluation (sequential) loader.

    Training drops the last incomplete batch when there is at least one full batch. ``balance``
    needs ``dataset.labels`` and is ignored for evaluation. Two loaders with the same arguments yield
    identical batches, epoch by epoch (see the module doc for resuming at a given epoch). Training
    over a dataset with ``keyed_items`` seeds each item's augmentation by its position in the epoch.
    ``rank`` and ``world_size`` shard every global batch of ``batch_size`` across processes (see the
    module doc); training then needs ``batch_size`` divisible by ``world_size`` and at least one full
    batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for {world_size} processes")
    n = len(dataset)  # type: ignore[arg-type]
    if not train:
        sampler = EpochSampler(n, "sequential", seed=seed, batch_size=batch_size, rank=rank,
                               world_size=world_size)  # fmt: skip
    else:
        if world_size > 1 and 0 < n < batch_size:
            raise ValueError(
                f"{n} training samples are fewer than one global batch ({batch_size}): "
                f"lower train.batch_size to shard it across {world_size} processes"
            )
        shard = {"keyed": bool(getattr(dataset, "keyed_items", False)), "batch_size": batch_size,
                 "rank": rank, "world_size": world_size}  # fmt: skip
        if balance:
            labels = getattr(dataset, "labels", None)
            if labels is None:
                raise ValueError("balance=True needs a dataset with a .labels array")
            sampler = EpochSampler(n, "balanced", seed=seed, labels=np.asarray(labels), **shard)
        else:
            sampler = EpochSampler(n, "shuffle", seed=seed, **shard)
        batch_size //= world_size
    return SeededLoader(
        dataset,
        seed=seed,
        sampler=sampler,
        batch_size=batch_size,
        drop_last=train and len(sampler) >= batch_size,
        num_workers=num_workers,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        persistent_workers=False,
    )
