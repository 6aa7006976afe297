"""Figures: the house style, slope guides, and saving as PNG + PDF (process 0 only). Headless (Agg)."""
from __future__ import annotations

import os
from typing import Optional

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["new_figure", "reference_slope", "save_figure", "plt"]


def new_figure(ncols: int = 1, width: float = 5.6, height: float = 4.2):
    """A row of ``ncols`` axes in the house style (grid, small legends); returns (figure, [axes])."""
    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8.5})
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def reference_slope(ax, x, y_at, slope: float, x0: Optional[float] = None, label: Optional[str] = None, **kw):
    """Draw a dashed guide y = y_at · (x/x0)^slope over the x-range."""
    x = np.asarray(x, np.float64)
    x0 = x0 if x0 is not None else float(np.sqrt(x[0] * x[-1]))
    kw = {"color": "0.5", "ls": "--", "lw": 1.0, **kw}
    ax.plot(x, y_at * (x / x0) ** slope, label=label or f"slope {slope:g}", **kw)


def save_figure(fig, workdir: str, name: str) -> list:
    """Save a matplotlib figure as ``workdir/name.png`` and ``.pdf`` (process 0 only); close it."""
    paths = []
    if jax.process_index() == 0:
        for ext in ("png", "pdf"):
            p = os.path.join(workdir, f"{name}.{ext}")
            fig.savefig(p, dpi=130 if ext == "png" else None, bbox_inches="tight")
            paths.append(p)
    plt.close(fig)
    return paths
