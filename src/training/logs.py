"""Training logs: a CSV (always), TensorBoard (when installed) and a PNG of the loss and the alphas.

``output/train_log.csv`` has one row per logged step: ``step``, ``loss``,
``lr_<group>`` per parameter group, ``samples_per_s``, ``grad_norm`` and
``alpha_<i>`` per synapse layer (the mean over heads). ``output/training.png``
plots the loss against the optimizer step (raw, faint, behind its debiased exponential moving average:
:func:`debiased_ema`, as TensorBoard smooths) with the loss named by what it measures (:func:`loss_name`:
the MSE on epsilon or on v, by the denoiser's prediction type), and each layer's alpha (the weight of the
picture's keys and values) against the step, labelled by layer (a colour bar past ten layers).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
from collections.abc import Sequence
from pathlib import Path

from ..files import write_atomic

__all__ = ["TrainingLog", "plot_training_log", "training_figure", "debiased_ema", "loss_name", "smoothing_weight"]

#: the loss curve's smoothing weight is ``1 - SMOOTHING_POINTS / logged points`` within [0.6, 0.99]: the average
#: reaches back about a tenth of the run (TensorBoard's slider is 0.6 by default; 0 is none)
SMOOTHING_POINTS = 10.0
SMOOTHING_RANGE = (0.6, 0.99)


def smoothing_weight(points: int) -> float:
    """The default smoothing weight for a loss curve of ``points`` logged values (see :data:`SMOOTHING_POINTS`)."""
    lo, hi = SMOOTHING_RANGE
    return round(min(max(1.0 - SMOOTHING_POINTS / max(points, 1), lo), hi), 2)
#: more synapse layers than this get a colour bar instead of a legend
LEGEND_LAYERS = 10


def loss_name(prediction_type: str = "epsilon", family: str = "ddpm", min_snr_gamma: float | None = None) -> str:
    """What the training loss measures, for the plot: the mean squared error on the denoiser's target.

    ``ddpm``: ``epsilon`` -> "MSE on ε", ``v_prediction`` -> "MSE on v"; ``edm``: the preconditioned network
    output F (whose target is ε- or v-like by the prediction type); ``flow``: the velocity ε − x₀. Min-SNR-γ
    weighting (ddpm only) is named too.
    """
    if family == "flow":
        name = "MSE on v (flow velocity ε − x₀)"
    else:
        target = {"epsilon": "ε", "v_prediction": "v"}.get(prediction_type, str(prediction_type))
        name = f"MSE on {target}" if family == "ddpm" else f"MSE on F (EDM-preconditioned {target})"
    if min_snr_gamma is not None and family == "ddpm":
        name = f"min-SNR-γ ({min_snr_gamma:g}) weighted {name}"
    return name


def debiased_ema(values: Sequence[float], weight: float) -> list[float]:
    """The exponential moving average TensorBoard draws: ``s_t = w s_{t-1} + (1 - w) x_t`` from ``s_0 = 0``,
    shown as ``s_t / (1 - w^t)`` (dividing out the zero start's bias), ``t`` counting the finite values.

    Computed in the algebraically equal running-mean form ``m_t = m_{t-1} + (x_t - m_{t-1}) (1 - w) / (1 - w^t)``
    (so ``m_1 = x_1``, a constant stays exactly that constant and every ``m_t`` lies within the inputs so far);
    a NaN or infinite value is passed through and does not move the average. ``weight`` in [0, 1); 0 returns
    the input.
    """
    w = float(weight)
    if not 0.0 <= w < 1.0:
        raise ValueError(f"weight: expected a number in [0, 1), got {weight!r}")
    out: list[float] = []
    mean, t = 0.0, 0
    for value in values:
        x = float(value)
        if not math.isfinite(x):
            out.append(x)
            continue
        t += 1
        gain = (1.0 - w) / (1.0 - w ** t)
        if gain >= 1.0:  # the first value, or no smoothing
            mean = x
        else:  # between the previous mean and x in exact arithmetic; clipped so rounding cannot leave it
            mean = min(max(mean + (x - mean) * gain, min(mean, x)), max(mean, x))
        out.append(mean)
    return out


class TrainingLog:
    """Writes on the main process only (``enabled``); a resumed run first drops rows after its step."""

    def __init__(self, output: str | Path, *, enabled: bool = True, tensorboard: bool = True, plot: bool = True,
                 loss_name: str = "loss", layer_names: Sequence[str] | None = None):
        self.output = Path(output)
        self.path = self.output / "train_log.csv"
        self.png = self.output / "training.png"
        self.enabled = enabled
        self.want_plot = plot
        #: what the loss measures (the plot's y label; see :func:`loss_name`)
        self.loss_name = loss_name
        #: the synapse's music layers, in the order of the ``alpha_<i>`` columns (the plot's legend)
        self.layer_names = list(layer_names) if layer_names is not None else None
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
        return plot_training_log(self.path, self.png, loss_name=self.loss_name, layer_names=self.layer_names)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def plot_training_log(csv_path: str | Path, png_path: str | Path, *, loss_name: str = "loss",
                      layer_names: Sequence[str] | None = None, smoothing: float | None = None) -> Path | None:
    """The training log as a PNG (:func:`training_figure`), written atomically; None if the log is empty."""
    fig = training_figure(csv_path, loss_name=loss_name, layer_names=layer_names, smoothing=smoothing)
    if fig is None:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)  # Agg, whatever pyplot's backend is
    png_path = Path(png_path)
    write_atomic(png_path, buffer.getvalue())
    return png_path


def training_figure(csv_path: str | Path, *, loss_name: str = "loss", layer_names: Sequence[str] | None = None,
                    smoothing: float | None = None):
    """The matplotlib ``Figure`` of a training log (None if it has no rows): the loss against the optimizer step
    (raw, faint, behind its :func:`debiased_ema` with weight ``smoothing``, by default
    :func:`smoothing_weight`; a log axis when it spans more than a decade) and, when the log
    has ``alpha_<i>`` columns, each synapse layer's alpha against the step (a legend named by ``layer_names``,
    or a colour bar past :data:`LEGEND_LAYERS` layers). A plain ``Figure``, never registered with pyplot."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    _, rows = read_log(csv_path)
    if not rows:
        return None
    steps = np.array([float(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    alpha_keys = [k for k in rows[0] if k.startswith("alpha_")]
    panels = 2 if alpha_keys else 1
    fig = Figure(figsize=(5.6 * panels, 3.8))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    if smoothing is None:
        smoothing = smoothing_weight(len(loss))
    smoothed = len(loss) > 2 and smoothing > 0
    ax.plot(steps, loss, color="C0", alpha=0.3 if smoothed else 1.0, lw=1, marker="" if len(loss) > 1 else "o",
            label="logged loss" if smoothed else "loss")
    if smoothed:
        ax.plot(steps, debiased_ema(loss, smoothing), color="C0", lw=2,
                label=f"smoothed (debiased EMA, w = {smoothing:g})")
    finite = loss[np.isfinite(loss)]
    if finite.size and finite.min() > 0 and finite.max() > 10 * finite.min():
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"loss: {loss_name}")
    ax.set_title("training loss", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(frameon=False, fontsize=8)
    if alpha_keys:
        ax = axes[1]
        many = len(alpha_keys) > LEGEND_LAYERS
        cmap = matplotlib.colormaps["viridis"]
        names = list(layer_names) if layer_names is not None and len(layer_names) == len(alpha_keys) else None
        for i, k in enumerate(alpha_keys):
            colour = cmap(i / max(len(alpha_keys) - 1, 1))
            label = f"{k[6:]}: {names[i]}" if names else f"layer {k[6:]}"
            ax.plot(steps, [_number(r[k]) for r in rows], color=colour, lw=1.5, label=label,
                    marker="" if len(steps) > 1 else "o")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("α (weight of the picture's keys/values)")
        ax.set_title("synapse α per layer (mean over heads)", fontsize=10)
        ax.grid(alpha=0.25)
        if many:
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            mappable = ScalarMappable(norm=Normalize(0, len(alpha_keys) - 1), cmap=cmap)
            fig.colorbar(mappable, ax=ax, label="synapse layer index")
        else:
            ax.legend(frameon=False, fontsize=7, title="synapse layer", title_fontsize=7)
    fig.tight_layout()
    return fig


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

