"""Reporting for a KNOW run (method.md §6-7): summary table, markdown, verdict and figures.

Pure functions of the two long tables that ``know run`` writes; no files, no pipeline objects
(``storage.results`` writes what these return).

    results  one row per (method, factor, seed, epoch): method, factor, seed, epoch, phase,
             test_acc (0..1), test_loss, train_loss, wall_s
    probe    one row per (method, factor, seed): method, factor, seed, acc, loss

What lives here:
    final_accuracy            test_acc at the last epoch of every (method, factor, seed)
    summarize                 one row per (method, factor): mean/std over seeds, paired
                              differences against the controls, wins, bootstrap CIs
    summary_markdown          the summary as a readable markdown table + notes + verdict
    verdict                   one honest paragraph about the best KNOW row
    plot_accuracy_vs_factor   final accuracy against the virtual-data factor (log2 axis)
    plot_learning_curves      mean test accuracy per epoch, std band, phase boundary
    paired_bootstrap_ci       percentile bootstrap CI of a mean paired difference

Controls and pairing.  A method is compared with a control only on the seeds both have (a
paired difference per seed; unpaired seeds are ignored).  ``naive`` and ``naive-lr`` are
taken at factor 1 and compared with every row; ``shrink`` at factor f is compared with the
rows at factor f only (NaN where there is no shrink row at f).  A control is not compared
with itself (NaN).  Differences are reported in accuracy units (0..1) in the summary and in
percentage points in the markdown; stds are sample stds (ddof=1, NaN for a single seed);
``wins`` counts paired seeds where the method is strictly better (NaN with no pair).

Example (runs as a doctest)::

    >>> import numpy as np, pandas as pd
    >>> rows = []
    >>> for seed in range(5):
    ...     for method, factor, acc in [("naive", 1, 0.900), ("naive-lr", 1, 0.902),
    ...                                 ("shrink", 2, 0.905), ("know", 2, 0.910)]:
    ...         for epoch in (1, 2, 3):
    ...             rows.append(dict(method=method, factor=float(factor), seed=seed,
    ...                              epoch=epoch, phase=1 if epoch == 1 else 2,
    ...                              test_acc=acc - 0.01 * (3 - epoch) + 0.001 * seed,
    ...                              test_loss=0.3, train_loss=0.2, wall_s=1.0))
    >>> results = pd.DataFrame(rows)
    >>> summary = summarize(results)
    >>> print(summary[["method", "factor", "n_seeds", "ft_mean"]].round(4).to_string(index=False))
      method  factor  n_seeds  ft_mean
       naive     1.0        5    0.902
    naive-lr     1.0        5    0.904
      shrink     2.0        5    0.907
        know     2.0        5    0.912
    >>> know = summary[summary.method == "know"].iloc[0]
    >>> round(float(know.ft_vs_naive_mean), 4), int(know.ft_vs_naive_wins), int(know.ft_vs_shrink_n)
    (0.01, 5, 5)
    >>> md = summary_markdown(summary, "Toy run", notes=["synthetic data"])
    >>> "| know | ×2 | 5 | 91.20 ± 0.16 | +1.00 ± 0.00 (5/5) |" in md
    True
    >>> fig = plot_accuracy_vs_factor(results)   # a matplotlib Figure (Agg canvas)
    >>> fig = plot_learning_curves(results)
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

KEYS = ["method", "factor"]
SEED_KEYS = ["method", "factor", "seed"]

#: controls and the factor their rows are taken at (None: the same factor as the method)
CONTROLS: dict[str, float | None] = {"naive": 1.0, "naive-lr": 1.0, "shrink": None}

#: display/sort order; unknown methods come after these, alphabetically
METHOD_ORDER = (
    "scratch",
    "naive",
    "naive-lr",
    "naive-full",
    "shrink",
    "taskvector",
    "logfit",
    "know-s2",
    "know-s3",
    "know",
    "know-official",
)

_S_ABLATION = re.compile(r"^know-s\d+$")


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def _method_rank(method: str) -> int:
    try:
        return METHOD_ORDER.index(method)
    except ValueError:
        return len(METHOD_ORDER)


def _sort_keys(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df.reset_index(drop=True)
    order = df.assign(_rank=df["method"].map(_method_rank))
    order = order.sort_values(["_rank", "method", "factor"], kind="stable")
    return order.drop(columns="_rank").reset_index(drop=True)


def _check_columns(df: pd.DataFrame, needed: Iterable[str], name: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{name} table lacks columns {missing}; has {list(df.columns)}")


def _normalise_keys(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out["method"] = out["method"].astype(str)
    out["factor"] = out["factor"].astype(float)
    out["seed"] = out["seed"].astype(int)
    return out


def final_accuracy(results: pd.DataFrame) -> pd.DataFrame:
    """``test_acc`` at the last epoch of every (method, factor, seed).

    Returns columns method, factor (float), seed (int), acc, sorted by method order, factor,
    seed.  The last epoch is the largest ``epoch`` of the group (if an epoch is listed twice,
    the row that comes later in the table wins); a NaN there stays NaN.
    """
    _check_columns(results, SEED_KEYS + ["epoch", "test_acc"], "results")
    df = _normalise_keys(results[SEED_KEYS + ["epoch", "test_acc"]])
    df = df.sort_values("epoch", kind="stable")
    last = df.drop_duplicates(SEED_KEYS, keep="last")
    out = last[SEED_KEYS + ["test_acc"]].rename(columns={"test_acc": "acc"})
    out = _sort_keys(out.sort_values(SEED_KEYS, kind="stable"))
    return out


def _per_seed(table: pd.DataFrame, value: str) -> pd.DataFrame:
    """(method, factor, seed, value): duplicates are averaged."""
    df = _normalise_keys(table[SEED_KEYS + [value]])
    return df.groupby(SEED_KEYS, as_index=False, sort=True)[value].mean()


def paired_bootstrap_ci(
    diffs: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    min_n: int = 3,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences (scipy.stats.bootstrap).

    Returns (nan, nan) with fewer than ``min_n`` finite differences, or if scipy is missing.
    With 3-5 seeds a bootstrap CI is too narrow (it cannot see beyond the seeds it has); read
    it as a description of the seeds, not as a test.
    """
    x = np.asarray(diffs, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < max(min_n, 2):
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    try:
        from scipy.stats import bootstrap
    except ImportError:  # pragma: no cover - scipy is a dependency of the project env
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bootstrap(
            (x,),
            np.mean,
            confidence_level=confidence,
            n_resamples=n_resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _group_stats(per_seed: pd.DataFrame, value: str, prefix: str, n_name: str) -> pd.DataFrame:
    g = per_seed.dropna(subset=[value]).groupby(KEYS, sort=False)[value]
    out = pd.DataFrame({n_name: g.count(), f"{prefix}_mean": g.mean(), f"{prefix}_std": g.std(ddof=1)})
    return out


def _paired_stats(
    per_seed: pd.DataFrame,
    value: str,
    control: str,
    control_factor: float | None,
    prefix: str,
    ci: float | None,
    n_resamples: int,
    ci_seed: int,
) -> pd.DataFrame:
    """Per (method, factor): paired diffs method - control over the seeds both have."""
    name = f"{prefix}_vs_{control}"
    ctrl = per_seed[per_seed["method"] == control]
    if control_factor is not None:
        ctrl = ctrl[np.isclose(ctrl["factor"], control_factor)]
        on = ["seed"]
        ctrl = ctrl[["seed", value]]
    else:
        on = ["factor", "seed"]
        ctrl = ctrl[["factor", "seed", value]]
    ctrl = ctrl.rename(columns={value: "_ctrl"})
    rows = per_seed[per_seed["method"] != control]  # a control is not compared with itself
    merged = rows.merge(ctrl, on=on, how="inner")
    merged["_diff"] = merged[value] - merged["_ctrl"]
    merged = merged[np.isfinite(merged["_diff"])]
    records = []
    for key, grp in merged.groupby(KEYS, sort=False):
        d = grp["_diff"].to_numpy(dtype=float)
        rec = {
            "method": key[0],
            "factor": key[1],
            f"{name}_n": int(d.size),
            f"{name}_mean": float(d.mean()),
            f"{name}_std": float(d.std(ddof=1)) if d.size > 1 else math.nan,
            f"{name}_wins": float((d > 0).sum()),
        }
        if ci is not None:
            lo, hi = paired_bootstrap_ci(d, confidence=ci, n_resamples=n_resamples, seed=ci_seed)
            rec[f"{name}_ci_lo"], rec[f"{name}_ci_hi"] = lo, hi
        records.append(rec)
    cols = [f"{name}_n", f"{name}_mean", f"{name}_std", f"{name}_wins"]
    if ci is not None:
        cols += [f"{name}_ci_lo", f"{name}_ci_hi"]
    if not records:
        return pd.DataFrame(columns=KEYS + cols).set_index(KEYS)
    return pd.DataFrame.from_records(records, columns=KEYS + cols).set_index(KEYS)


def summarize(
    results: pd.DataFrame,
    probe: pd.DataFrame | None = None,
    controls: Mapping[str, float | None] | None = None,
    ci: float | None = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (method, factor) found in ``results`` or ``probe``.

    Columns, in order:
        method, factor, n_seeds, ft_mean, ft_std,
        for c in controls: ft_vs_<c>_n, _mean, _std, _wins[, _ci_lo, _ci_hi],
        probe_n_seeds, probe_mean, probe_std,
        for c in controls: probe_vs_<c>_n, _mean, _std, _wins

    ``ft`` is the final fine-tune accuracy (:func:`final_accuracy`), ``probe`` the probe
    ``acc``; both in 0..1.  ``_n`` is the number of paired seeds (0 when the control is
    missing, and then mean/std/wins are NaN).  ``ci`` adds percentile-bootstrap CIs of the
    fine-tune differences (needs >= 3 paired seeds, else NaN); ``ci=None`` skips them.
    Without ``probe`` the probe columns are present and NaN, so the schema never changes.
    """
    controls = dict(CONTROLS if controls is None else controls)
    ft = final_accuracy(results).rename(columns={"acc": "ft"})
    ft = _per_seed(ft, "ft")
    parts = [_group_stats(ft, "ft", "ft", "n_seeds")]
    for c, cf in controls.items():
        parts.append(_paired_stats(ft, "ft", c, cf, "ft", ci, n_resamples, seed))

    if probe is not None and len(probe):
        _check_columns(probe, SEED_KEYS + ["acc"], "probe")
        pr = _per_seed(probe.rename(columns={"acc": "probe"}), "probe")
    else:
        pr = pd.DataFrame({"method": pd.Series(dtype=str), "factor": pd.Series(dtype=float),
                           "seed": pd.Series(dtype=int), "probe": pd.Series(dtype=float)})
    parts.append(_group_stats(pr, "probe", "probe", "probe_n_seeds"))
    for c, cf in controls.items():
        parts.append(_paired_stats(pr, "probe", c, cf, "probe", None, n_resamples, seed))

    keys = pd.concat([ft[KEYS], pr[KEYS]]).drop_duplicates()
    out = keys.set_index(KEYS)
    for part in parts:
        out = out.join(part, how="left")
    out = out.reset_index()
    for col in out.columns:
        if col == "n_seeds" or col == "probe_n_seeds" or col.endswith("_n"):
            out[col] = out[col].fillna(0).astype(int)
        elif col not in KEYS:
            out[col] = out[col].astype(float)
    return _sort_keys(out)


# --------------------------------------------------------------------------------------------
# markdown and verdict
# --------------------------------------------------------------------------------------------

_DASH = "—"


def _fmt_factor(f: float) -> str:
    f = float(f)
    return f"×{int(f)}" if f.is_integer() else f"×{f:g}"


def _fmt_acc(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return _DASH
    if not np.isfinite(std):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _fmt_diff(row: Mapping, name: str) -> str:
    n = int(row.get(f"{name}_n", 0) or 0)
    mean = row.get(f"{name}_mean", math.nan)
    if n == 0 or not np.isfinite(mean):
        return _DASH
    std = row.get(f"{name}_std", math.nan)
    wins = int(row.get(f"{name}_wins", 0))
    text = f"{100 * mean:+.2f}"
    if np.isfinite(std):
        text += f" ± {100 * std:.2f}"
    return f"{text} ({wins}/{n})"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def summary_markdown(
    summary: pd.DataFrame,
    title: str,
    notes: Sequence[str] = (),
    include_verdict: bool = True,
) -> str:
    """The summary as markdown: a title, one table row per (method, factor), the notes as
    bullets and (``include_verdict``) the :func:`verdict` paragraph.

    Accuracies in %, differences in percentage points: ``+0.31 ± 0.20 (4/5)`` is the mean ±
    sample std of the paired per-seed differences, then wins / paired seeds.  "—" = no data.
    """
    header = [
        "method", "factor", "seeds", "fine-tune acc (%)", "Δ vs naive", "Δ vs naive-lr",
        "Δ vs shrink", "probe acc (%)", "probe Δ vs naive",
    ]
    lines = [f"## {title}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|")
    for row in summary.to_dict("records"):
        cells = [
            _cell(row["method"]),
            _fmt_factor(row["factor"]),
            str(int(row.get("n_seeds", 0))),
            _fmt_acc(row.get("ft_mean", math.nan), row.get("ft_std", math.nan)),
            _fmt_diff(row, "ft_vs_naive"),
            _fmt_diff(row, "ft_vs_naive-lr"),
            _fmt_diff(row, "ft_vs_shrink"),
            _fmt_acc(row.get("probe_mean", math.nan), row.get("probe_std", math.nan)),
            _fmt_diff(row, "probe_vs_naive"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Δ = paired difference in percentage points over the seeds present in both rows: "
        "mean ± sample std (wins / paired seeds). naive and naive-lr are taken at ×1; shrink "
        "at the same factor as the row. — = no data."
    )
    notes = list(notes)
    if notes:
        lines.append("")
        lines.extend(f"- {note}" for note in notes)
    if include_verdict:
        lines += ["", f"**Verdict.** {verdict(summary)}"]
    return "\n".join(lines) + "\n"


def _judge(row: Mapping, name: str, control: str) -> tuple[str, bool | None]:
    """('beats naive (+1.15 ± 0.10 points, 5/5 seeds)', True/False/None=unknown)."""
    n = int(row.get(f"{name}_n", 0) or 0)
    mean = row.get(f"{name}_mean", math.nan)
    if n == 0 or not np.isfinite(mean):
        return f"cannot be compared with {control} (no paired seeds)", None
    std = row.get(f"{name}_std", math.nan)
    wins = int(row.get(f"{name}_wins", 0))
    spread = f" ± {100 * std:.2f}" if np.isfinite(std) else ""
    stats = f"{100 * mean:+.2f}{spread} points, better on {wins}/{n} seeds"
    if n < 2:
        return f"cannot be judged against {control} from a single paired seed ({stats})", None
    if mean > 0 and wins > n / 2 and np.isfinite(std) and mean > std:
        return f"beats {control} ({stats})", True
    if mean <= 0:
        return f"does not beat {control} ({stats}; not better on average)", False
    why = "the mean gain is within one std" if not (mean > std) else "it wins on too few seeds"
    return f"does not clearly beat {control} ({stats}; {why})", False


def verdict(summary: pd.DataFrame, controls: Sequence[str] | None = None) -> str:
    """One paragraph on the best KNOW row (the highest mean fine-tune accuracy among methods
    starting with 'know', S-ablations 'know-sN' excluded).

    "beats <control>" needs, over the paired seeds, a positive mean difference larger than
    its sample std and wins on more than half of them; anything less is reported as "does
    not beat" / "does not clearly beat".  This is a screen over a handful of seeds, not a
    significance test, and the paragraph says so.
    """
    controls = list(CONTROLS if controls is None else controls)
    is_know = summary["method"].str.startswith("know") & ~summary["method"].str.match(_S_ABLATION)
    cand = summary[is_know]
    if cand.empty:
        return "No KNOW rows in this run, so there is nothing to judge."
    score = cand["ft_mean"].where(cand["ft_mean"].notna(), cand["probe_mean"])
    if score.notna().sum() == 0:
        return "The KNOW rows have neither fine-tune nor probe accuracies, so there is nothing to judge."
    best = cand.loc[score.idxmax()].to_dict()
    label = f"{best['method']} {_fmt_factor(best['factor'])}"
    parts = [
        f"Best KNOW row: {label} (fine-tune {_fmt_acc(best['ft_mean'], best['ft_std'])} %, "
        f"{int(best['n_seeds'])} seeds"
    ]
    if len(cand) > 1:
        parts[0] += (f"; chosen as the highest mean of {len(cand)} KNOW rows, so its margins "
                     "are optimistic")
    parts[0] += ")."
    ft_flags = {}
    for prefix, what in (("ft", "On fine-tuning"), ("probe", "On the linear probe")):
        if prefix == "probe" and int(best.get("probe_n_seeds", 0)) == 0:
            parts.append("There is no probe result for this row.")
            continue
        judged = [_judge(best, f"{prefix}_vs_{c}", c) for c in controls]
        if prefix == "ft":
            ft_flags = {c: flag for c, (_, flag) in zip(controls, judged)}
        parts.append(f"{what} it " + "; it ".join(text for text, _ in judged) + ".")
    if "shrink" in ft_flags:
        flag = ft_flags["shrink"]
        if flag is True:
            parts.append("Its fine-tuning gain survives the shrink control at this factor.")
        elif flag is False:
            parts.append("So the best KNOW row does not show a gain beyond shrinking Θ0 "
                         "(the shrink control, method §6).")
        else:
            parts.append("Without a shrink comparison this run cannot show that KNOW adds "
                         "more than shrinking Θ0 (method §6).")
    if len(cand) > 1 and "shrink" in controls:
        judged = [_judge(r, "ft_vs_shrink", "shrink")[1] for r in cand.to_dict("records")]
        known = [f for f in judged if f is not None]
        if known:
            parts.append(f"Across all {len(cand)} KNOW rows, {sum(known)} of the {len(known)} "
                         "with a shrink row at their factor beat shrink on fine-tuning by the "
                         "same rule (several comparisons, so a single win can be chance).")
    parts.append("'Beats' here means a positive mean paired difference larger than its std "
                 "with wins on most seeds: a screen over few seeds, not a significance test.")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# figures (matplotlib imported lazily; figures use an Agg canvas, pyplot is never touched)
# --------------------------------------------------------------------------------------------


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
    ordered = sorted(set(methods), key=lambda m: (_method_rank(m), m))
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
    stats = _sort_keys(stats)
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
    ax.set_xticklabels([_fmt_factor(f) for f in factors])
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
    _check_columns(results, SEED_KEYS + ["epoch", "test_acc"], "results")
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
    keys = _sort_keys(stats[KEYS].drop_duplicates())
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
                    label=f"{method} {_fmt_factor(factor)}" if panel == 0 else None)
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


__all__ = [
    "CONTROLS",
    "METHOD_ORDER",
    "final_accuracy",
    "summarize",
    "summary_markdown",
    "verdict",
    "paired_bootstrap_ci",
    "plot_accuracy_vs_factor",
    "plot_learning_curves",
]
