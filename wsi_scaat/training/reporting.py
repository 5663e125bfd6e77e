"""Per-epoch training records: ``metrics.csv`` and ``curves.png``, both written atomically."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from wsi_scaat.atomic import atomic_output, write_text


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    """One row per epoch; columns are the union of the rows' keys, epoch first."""
    columns = ["epoch"] + sorted({k for row in history for k in row} - {"epoch"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(path, buf.getvalue())


def write_curves(path: Path, history: list[dict[str, float]], title: str = "") -> None:
    """Loss (train, val) and accuracy/AUROC curves against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, keys in ((ax_loss, ("train_loss", "val_loss")),
                     (ax_acc, ("train_accuracy", "val_accuracy", "val_auroc"))):  # fmt: skip
        for key in keys:
            values = [row.get(key, math.nan) for row in history]
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, marker="o", label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("accuracy / AUROC")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
