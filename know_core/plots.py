"""Figures of a KNOW run (method.md §7): accuracy against the factor and learning curves.

Every function takes the ``results`` long table (see ``know_core.stats``) and RETURNS a
``matplotlib.figure.Figure`` on an Agg canvas; nothing is shown or written here
(``storage.results.save_figure`` saves and closes it).  matplotlib is imported lazily,
inside the functions, and pyplot is never touched.

What lives here:
    plot_accuracy_vs_factor   final accuracy against the virtual-data factor (log2 axis)
    plot_learning_curves      mean test accuracy per epoch, std band, phase boundary

Example (runs as a doctest)::

    >>> import pandas as pd
    >>> results = pd.DataFrame([
    ...     dict(method=m, factor=f, seed=s, epoch=e, phase=1 if e == 1 else 2,
    ...          test_acc=0.8 + 0.05 * e + 0.01 * s)
    ...     for m, f in [("naive", 1.0), ("know", 2.0), ("know", 4.0)]
    ...     for s in range(2) for e in (1, 2, 3)])
    >>> fig = plot_accuracy_vs_factor(results, title="toy")
    >>> type(fig).__name__, fig.axes[0].get_title()
    ('Figure', 'toy')
    >>> len(plot_learning_curves(results).axes)   # phase 2 gets a zoomed panel of its own
    2
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .stats import KEYS, SEED_KEYS, check_columns, final_accuracy, method_rank, sort_keys
from .verdict import fmt_factor


def _new_figure(figsize: tuple[float, float], ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _method_colors(methods: Sequence[str]) -> dict[str, tuple]:
    import matplotlib

    palette = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["Dark2"].colors)
    ordered = sorted(set(methods), key=lambda m: (method_rank(m), m))
    return {m: palette[i % len(palette)] for i, m in enumerate(ordered)}


def _focus_ylim(ax, values: pd.DataFrame, ignore: Sequence[str]) -> set[str]:
    """Fit the y range to the methods not in ``ignore`` (``values``: method, lo, hi in %);
    returns the ignored methods that fall outside it."""
    inside = values[~values["method"].isin(list(ignore))]
    if inside.empty or len(inside) == len(values):
        return set()
    lo, hi = float(inside["lo"].min()), float(inside["hi"].max())
    pad = max(0.08 * (hi - lo), 0.05)
    lo, hi = lo - pad, hi + pad
    ax.set_ylim(lo, hi)
    out = values[values["method"].isin(list(ignore)) & ((values["hi"] < lo) | (values["lo"] > hi))]
    return set(out["method"])


def plot_accuracy_vs_factor(
    results: pd.DataFrame,
    title: str | None = None,
    methods: Sequence[str] | None = None,
    off_scale: Sequence[str] = ("scratch",),
):
    """Final fine-tune accuracy (mean ± std over seeds, %) against the factor, log2 x axis.

    Methods present only at factor 1 (naive, naive-lr, ...) are drawn as a horizontal dashed
    line with a ±std band across the plot plus a point at ×1; the rest as lines with error
    bars.  ``methods`` restricts the plot; methods in ``off_scale`` do not set the y range
    (scratch would squash the differences that matter) and, when they fall outside it, keep
    a legend entry that gives their accuracy.  Returns a ``matplotlib.figure.Figure``.
    """
    final = final_accuracy(results)
    if methods is not None:
        final = final[final["method"].isin(list(methods))]
    stats = final.groupby(KEYS, sort=False)["acc"].agg(["mean", "std", "count"]).reset_index()
    stats = sort_keys(stats)
    fig, (ax,) = _new_figure((7.0, 4.5))
    if stats.empty:
        ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
        return fig
    colors = _method_colors(stats["method"].tolist())
    factors = sorted(stats["factor"].unique())
    spread = 100 * np.nan_to_num(stats["std"].to_numpy())
    hidden = _focus_ylim(ax, pd.DataFrame({"method": stats["method"],
                                           "lo": 100 * stats["mean"] - spread,
                                           "hi": 100 * stats["mean"] + spread}), off_scale)
    for method, grp in stats.groupby("method", sort=False):
        grp = grp.sort_values("factor")
        mean, std = 100 * grp["mean"].to_numpy(), 100 * np.nan_to_num(grp["std"].to_numpy())
        color = colors[method]
        label = f"{method} (n={int(grp['count'].max())})"
        if method in hidden:
            label += ": " + ", ".join(f"{m:.2f}" for m in mean) + " %, off scale"
        if len(grp) == 1 and np.isclose(grp["factor"].iloc[0], 1.0):
            ax.axhline(mean[0], color=color, ls="--", lw=1.2, label=label)
            if std[0] > 0:
                ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=color, alpha=0.12, lw=0)
            ax.errorbar([1.0], mean, yerr=std, fmt="o", color=color, capsize=3)
        else:
            style = "-" if method.startswith("know") else "-."
            ax.errorbar(grp["factor"], mean, yerr=std, fmt="o" + style, color=color,
                        capsize=3, lw=1.5, label=label)
    ax.set_xscale("log", base=2)
    lo, hi = min(factors), max(factors)
    ax.set_xlim(lo / 1.3, hi * 1.3)
    ax.set_xticks(factors)
    ax.set_xticklabels([fmt_factor(f) for f in factors])
    ax.minorticks_off()
    ax.set_xlabel("virtual-data factor (log2)")
    ax.set_ylabel("final fine-tune test accuracy (%)")
    ax.set_title(title or "Fine-tune accuracy vs. factor (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def plot_learning_curves(
    results: pd.DataFrame,
    title: str | None = None,
    methods: Sequence[str] | None = None,
    off_scale: Sequence[str] = ("scratch",),
):
    """Mean test accuracy (%) per epoch for every (method, factor), light ±std band, and a
    vertical line at each phase-1/phase-2 boundary.  When phase 2 exists a second panel
    shows it alone, where the differences between start points are visible; its y range
    ignores the methods in ``off_scale``.  ``methods`` restricts the plot.
    """
    check_columns(results, SEED_KEYS + ["epoch", "test_acc"], "results")
    df = results.copy()
    df["method"] = df["method"].astype(str)
    df["factor"] = df["factor"].astype(float)
    if methods is not None:
        df = df[df["method"].isin(list(methods))]
    stats = df.groupby(KEYS + ["epoch"], sort=True)["test_acc"].agg(["mean", "std"]).reset_index()
    boundaries: list[float] = []
    if "phase" in df.columns and (df["phase"] == 1).any() and (df["phase"] == 2).any():
        ends = df[df["phase"] == 1].groupby(SEED_KEYS)["epoch"].max().unique()
        boundaries = sorted(float(e) + 0.5 for e in ends)
    zoom = bool(boundaries)
    fig, axes = _new_figure((12.0 if zoom else 8.0, 4.5), ncols=2 if zoom else 1)
    if stats.empty:
        axes[0].text(0.5, 0.5, "no results", ha="center", va="center", transform=axes[0].transAxes)
        return fig
    colors = _method_colors(stats["method"].tolist())
    styles = ["-", "--", "-.", ":"]
    keys = sort_keys(stats[KEYS].drop_duplicates())
    for panel, ax in enumerate(axes):
        for method, factor in keys.itertuples(index=False):
            grp = stats[(stats["method"] == method) & (stats["factor"] == factor)]
            if panel == 1:
                grp = grp[grp["epoch"] > boundaries[0]]
            if grp.empty:
                continue
            fidx = sorted(stats.loc[stats["method"] == method, "factor"].unique()).index(factor)
            x = grp["epoch"].to_numpy(dtype=float)
            m = 100 * grp["mean"].to_numpy()
            s = 100 * grp["std"].to_numpy()
            ax.plot(x, m, color=colors[method], ls=styles[fidx % len(styles)], lw=1.3,
                    label=f"{method} {fmt_factor(factor)}" if panel == 0 else None)
            if np.isfinite(s).any():
                ax.fill_between(x, m - s, m + s, color=colors[method], alpha=0.12, lw=0)
        for b in boundaries:
            if panel == 0:
                ax.axvline(b, color="0.3", ls=":", lw=1)
        if panel == 0 and boundaries:
            ax.text(boundaries[0], 0.02, " phase 1 | phase 2 ", transform=ax.get_xaxis_transform(),
                    ha="center", fontsize=8, color="0.3", backgroundcolor="white")
        if panel == 1:
            late = stats[stats["epoch"] > boundaries[0]]
            _focus_ylim(ax, pd.DataFrame({"method": late["method"],
                                          "lo": 100 * late["mean"], "hi": 100 * late["mean"]}),
                        off_scale)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(title or "Learning curves (mean ± std over seeds)")
    if zoom:
        axes[1].set_title("phase 2 only" + (f" ({', '.join(off_scale)} may be off scale)"
                                            if set(off_scale) & set(keys["method"]) else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


__all__ = ["plot_accuracy_vs_factor", "plot_learning_curves"]
