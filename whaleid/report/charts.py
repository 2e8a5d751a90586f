"""The report's charts, drawn by matplotlib (the Agg canvas: no display needed) so that a user can
restyle or extend them with the library everyone reads plots with. Figures are made without pyplot:
no global state, safe in worker processes.

    training_curves(epochs, hist, monitor, kept) -> Figure   loss, and the metric early stopping followed
    threshold_sweep(sweep, ...) -> Figure                    open-set MAP@5 against the new_whale threshold

A Figure is saved with fig.savefig(path) (report.Writer does it atomically).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from whaleid.report.drawing import BLUE, GREEN, GREY, ORANGE, PURPLE, RED


def rgb(c: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(v / 255 for v in c)


def _done(fig: Figure) -> Figure:
    fig.tight_layout()
    FigureCanvasAgg(fig)  # the raster canvas, whatever backend a user's matplotlib defaults to
    return fig


def _finite(s: pd.Series) -> bool:
    return np.isfinite(pd.to_numeric(s, errors="coerce").to_numpy(float)).any()


def training_curves(epochs: np.ndarray, hist: pd.DataFrame, monitor: str | None, kept: int | None) -> Figure:
    """Two panels: the losses, and the metric that chose the kept model (`monitor`, e.g. val_map5 for
    the retrieval heads, val_accuracy for softmax) beside the other metrics the history holds. The kept
    epoch (1-based) is a dashed line on both and a dot on the monitored curve."""
    metric_cols = [c for c in hist.columns if c not in ("epoch", "loss", "val_loss", "lr", "learning_rate")
                   and _finite(hist[c])]
    if monitor in metric_cols:  # the monitored metric drawn last, on top, in the validation colour
        metric_cols = [c for c in metric_cols if c != monitor] + [monitor]
    loss_cols = [c for c in ("loss", "val_loss") if c in hist.columns and _finite(hist[c])]
    panels = [("loss", loss_cols)] if loss_cols else []
    if metric_cols:
        panels.append((monitor if monitor in metric_cols else "metrics", metric_cols))
    fig = Figure(figsize=(6.4 * max(1, len(panels)), 4.4))
    others = iter([BLUE, GREEN, PURPLE, GREY])
    for i, (title, cols) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for c in cols:
            color = ORANGE if c in (monitor, "val_loss") else next(others, GREY)
            width = 2.6 if c == monitor else 1.8
            label = f"{c} (monitored)" if c == monitor else c
            ax.plot(epochs, hist[c].to_numpy(float), color=rgb(color), lw=width, label=label,
                    marker="o" if len(epochs) <= 40 else None, ms=4)
        if kept is not None:
            ax.axvline(kept, color=rgb(GREY), ls="--", lw=1.2, label=f"kept epoch {kept}")
            if monitor in cols:
                ax.plot([kept], [float(hist[monitor].iloc[kept - 1])], "o", color=rgb(RED), ms=9, zorder=5)
        ax.set_title(("loss" if "val_loss" in cols else "training loss") if title == "loss" else f"{title}: the metric early stopping followed"
                     if title == monitor else "metrics")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, color="0.9")
        ax.legend(fontsize=8)
    return _done(fig)


def threshold_sweep(sweep: pd.DataFrame, *, threshold: float | None = None, map5: float | None = None,
                    baseline: float | None = None, best: tuple[float, float] | None = None,
                    tuned: float | None = None) -> Figure:
    """MAP@5 at every new_whale threshold of the sweep, with the configured, best and tuned thresholds
    and the all-new_whale baseline marked."""
    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot()
    if baseline is not None:
        ax.axhline(baseline, color=rgb(GREY), ls="--", lw=1.2, label=f"all new_whale baseline {baseline:.3f}")
    ax.plot(sweep.threshold, sweep.map5, color=rgb(BLUE), lw=2.2, marker="o" if len(sweep) <= 30 else None,
            ms=4, label="MAP@5")
    if threshold is not None:
        at = map5 if map5 is not None else float(np.interp(threshold, sweep.threshold, sweep.map5))
        ax.axvline(threshold, color=rgb(RED), lw=1.5, label=f"configured threshold {threshold:.3f}: MAP@5 {at:.3f}")
        ax.plot([threshold], [at], "o", color=rgb(RED), ms=8)
    if best is not None:
        ax.plot([best[0]], [best[1]], "o", color=rgb(GREEN), ms=9,
                label=f"best threshold {best[0]:.2f}: MAP@5 {best[1]:.3f}")
    if tuned is not None and (threshold is None or abs(tuned - threshold) > 1e-9):
        ax.axvline(tuned, color=rgb(PURPLE), ls=":", lw=1.8, label=f"tuned threshold {tuned:.2f} (predict uses it)")
    ax.set_xlim(min(0.0, float(sweep.threshold.min())), max(1.0, float(sweep.threshold.max())))
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("new_whale threshold")
    ax.set_ylabel("MAP@5")
    ax.set_title("Open-set MAP@5 vs new_whale threshold (validation)")
    ax.grid(True, color="0.9")
    ax.legend(fontsize=8, loc="lower left")
    return _done(fig)
