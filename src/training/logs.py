"""Training logs: a CSV (always), TensorBoard (when installed) and a PNG of the loss and the alphas.

``output/train_log.csv`` has one row per logged step: ``step``, ``loss``,
``lr_<group>`` per parameter group, ``samples_per_s``, ``grad_norm`` and
``alpha_<i>`` per synapse layer (the mean over heads). ``output/training.png``
plots the loss (raw and smoothed) and each layer's alpha against the step.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
from pathlib import Path

from ..files import write_atomic

__all__ = ["TrainingLog", "plot_training_log"]


class TrainingLog:
    """Writes on the main process only (``enabled``); a resumed run first drops rows after its step."""

    def __init__(self, output: str | Path, *, enabled: bool = True, tensorboard: bool = True, plot: bool = True):
        self.output = Path(output)
        self.path = self.output / "train_log.csv"
        self.png = self.output / "training.png"
        self.enabled = enabled
        self.want_plot = plot
        self._writer = None
        if enabled and tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.output / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keep only rows up to ``step`` (0: start a new log), so a resumed run's log reads as one run."""
        if not self.enabled or not self.path.is_file():
            return
        fields, rows = read_log(self.path)
        kept = [r for r in rows if int(float(r["step"])) <= step]
        write_atomic(self.path, _csv_text(fields, kept) if kept else "")

    def write(self, step: int, loss: float, lrs: dict[str, float], alphas: list[float],
              samples_per_s: float, grad_norm: float | None) -> None:
        if not self.enabled:
            return
        row = {"step": step, "loss": f"{loss:.6g}"}
        row.update({f"lr_{k}": f"{v:.6g}" for k, v in lrs.items()})
        row["samples_per_s"] = f"{samples_per_s:.4g}"
        row["grad_norm"] = "" if grad_norm is None else f"{grad_norm:.6g}"
        row.update({f"alpha_{i}": f"{a:.6g}" for i, a in enumerate(alphas)})
        self.output.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self._writer is not None:
            self._writer.add_scalar("loss", loss, step)
            for k, v in lrs.items():
                self._writer.add_scalar(f"lr/{k}", v, step)
            for i, a in enumerate(alphas):
                self._writer.add_scalar(f"alpha/{i}", a, step)
            self._writer.add_scalar("samples_per_s", samples_per_s, step)

    def plot(self) -> Path | None:
        if not (self.enabled and self.want_plot and self.path.is_file()):
            return None
        return plot_training_log(self.path, self.png)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def plot_training_log(csv_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss (raw and smoothed) and alphas per layer against the step, as a PNG; None if the log is empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    _, rows = read_log(csv_path)
    if not rows:
        return None
    steps = np.array([float(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    alpha_keys = [k for k in rows[0] if k.startswith("alpha_")]
    panels = 2 if alpha_keys else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, loss, color="0.75", lw=1, label="loss")
    if len(loss) > 2:
        smooth = np.empty_like(loss)
        smooth[0] = loss[0]
        for i in range(1, len(loss)):
            smooth[i] = 0.9 * smooth[i - 1] + 0.1 * loss[i]
        ax.plot(steps, smooth, color="C0", lw=2, label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend(frameon=False)
    if alpha_keys:
        ax = axes[0, 1]
        cmap = plt.get_cmap("viridis", max(len(alpha_keys), 2))
        for i, k in enumerate(alpha_keys):
            ax.plot(steps, [_number(r[k]) for r in rows], color=cmap(i), lw=1.5, label=f"layer {k[6:]}")
        ax.set_xlabel("step")
        ax.set_ylabel("alpha")
        ax.set_title("synapse alpha per layer")
        ax.legend(frameon=False, fontsize=7, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    png_path = Path(png_path)
    write_atomic(png_path, buffer.getvalue())
    return png_path


def read_log(path: str | Path) -> tuple[list[str], list[dict]]:
    """``(columns, rows)`` of a training log; rows a killed run left half-written (no step or loss) are dropped."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise OSError(f"log: {str(path)!r} is not a training log CSV ({exc})") from None
    if rows and not {"step", "loss"} <= set(fields):
        raise OSError(f"log: {str(path)!r} is not a training log CSV (no step and loss columns)")
    good = []
    for r in rows:
        if None in r or any(v is None for v in r.values()):  # too many or too few fields: a cut-off line
            continue
        try:
            if not math.isfinite(float(r["step"])):
                continue
            float(r["loss"])  # a NaN loss is a fact worth plotting; an unreadable one is a cut-off line
        except ValueError:
            continue
        good.append(r)
    return fields, good


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _csv_text(fields: list[str], rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()

