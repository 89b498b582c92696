"""The regime study's table, picture and conclusion (issue 13), from each variant's report.

Pure functions of the tables a `know run` writes (summary.csv from ``know_core.stats.summarize``
and target_diagnostics.csv); ``flows/study.py`` reads and writes the files.

    study_table        one row per variant: the target's conv coherence, each predictor's
                       held-out-window L1, KNOW x2/x8 against naive, its own shrink control and
                       naive-lr, know-lr against naive-lr (tuned vs tuned), the probe, seeds
    conclusion         the sentence the numbers allow (a margin of two paired stds, >= 5 seeds)
    study_markdown     the table as markdown, the notes and the conclusion
    plot_gain_vs_coherence   KNOW's gain over its own shrink control against conv coherence

Differences are in accuracy units (0..1) in the table and in points in the text.

    >>> import pandas as pd
    >>> s = pd.DataFrame([dict(method="know", factor=2.0, n_seeds=5, ft_mean=.9, ft_vs_naive_mean=.01,
    ...                        ft_vs_naive_std=.001, ft_vs_naive_n=5, ft_vs_shrink_mean=.004,
    ...                        ft_vs_shrink_std=.001, ft_vs_shrink_n=5)])
    >>> d = pd.DataFrame([dict(predictor="identity", kind="all", l1=.5, coherence_conv=.2)])
    >>> t = study_table({"v": (s, d)})
    >>> round(float(t.loc[0, "know_x2_vs_shrink"]), 3), float(t.loc[0, "coherence_conv"])
    (0.004, 0.2)
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

#: KNOW factors the table reports (the screen runs both)
FACTORS = (2.0, 8.0)
#: the margin the conclusion asks for, in paired standard deviations, and the seeds it needs
MARGIN_STDS = 2.0
MIN_SEEDS = 5

_L1 = {"identity": "l1_identity", "logfit": "l1_logfit", "know (ours)": "l1_ours", "know (official)": "l1_official"}


def _row(summary: pd.DataFrame, method: str, factor: float | None = None) -> dict:
    rows = summary[summary["method"] == method]
    if factor is not None:
        rows = rows[np.isclose(rows["factor"].astype(float), factor)]
    return rows.iloc[0].to_dict() if len(rows) else {}


def _diff(row: Mapping, control: str) -> tuple[float, float, int]:
    n = int(row.get(f"ft_vs_{control}_n", 0) or 0)
    if not n:
        return math.nan, math.nan, 0
    return float(row.get(f"ft_vs_{control}_mean", math.nan)), float(row.get(f"ft_vs_{control}_std", math.nan)), n


def study_table(variants: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]]) -> pd.DataFrame:
    """One row per variant from its (summary, target diagnostics) tables."""
    out = []
    for name, (summary, diag) in variants.items():
        rec: dict = {"variant": name}
        rec["coherence_conv"] = float(diag["coherence_conv"].iloc[0]) if "coherence_conv" in diag and len(diag) else math.nan
        allk = diag[diag["kind"] == "all"] if "kind" in diag else diag.iloc[0:0]
        for label, col in _L1.items():
            vals = allk[allk["predictor"] == label]["l1"]
            rec[col] = float(vals.mean()) if len(vals) else math.nan
        naive = _row(summary, "naive", 1.0)
        rec["naive_acc"] = float(naive.get("ft_mean", math.nan))
        rec["n_seeds"] = int(naive.get("n_seeds", 0) or 0)
        for f in FACTORS:
            key = f"know_x{int(f)}"
            row = _row(summary, "know", f)
            rec[f"{key}_acc"] = float(row.get("ft_mean", math.nan))
            for control, label in (("naive", "naive"), ("shrink", "shrink"), ("naive-lr", "naive_lr")):
                m, s, n = _diff(row, control)
                rec[f"{key}_vs_{label}"], rec[f"{key}_vs_{label}_std"], rec[f"{key}_vs_{label}_n"] = m, s, n
            rec[f"{key}_probe_vs_naive"] = float(row.get("probe_vs_naive_mean", math.nan))
        tuned = _row(summary, "know-lr")
        m, s, n = _diff(tuned, "naive-lr")
        rec["know_lr_factor"] = float(tuned.get("factor", math.nan))
        rec["know_lr_vs_naive_lr"], rec["know_lr_vs_naive_lr_std"], rec["know_lr_vs_naive_lr_n"] = m, s, n
        out.append(rec)
    return pd.DataFrame(out)


def _z(mean: float, std: float, n: int) -> float:
    """Margin in paired stds; -inf without enough seeds or a spread (a single seed proves nothing)."""
    if n < MIN_SEEDS or not (np.isfinite(mean) and np.isfinite(std)) or std <= 0:
        return -math.inf
    return mean / std


def _scores(rec: Mapping) -> tuple[float, str]:
    """(the variant's margin: the smaller of its best shrink margin and its tuned margin, which row)."""
    best, which = -math.inf, ""
    for f in FACTORS:
        key = f"know_x{int(f)}"
        z = _z(rec.get(f"{key}_vs_shrink", math.nan), rec.get(f"{key}_vs_shrink_std", math.nan),
               int(rec.get(f"{key}_vs_shrink_n", 0) or 0))
        if z > best:
            best, which = z, f"know ×{int(f)}"
    tuned = _z(rec.get("know_lr_vs_naive_lr", math.nan), rec.get("know_lr_vs_naive_lr_std", math.nan),
               int(rec.get("know_lr_vs_naive_lr_n", 0) or 0))
    return min(best, tuned), which


def _pts(rec: Mapping, col: str) -> str:
    m, s, n = rec.get(col, math.nan), rec.get(f"{col}_std", math.nan), int(rec.get(f"{col}_n", 0) or 0)
    if not n or not np.isfinite(m):
        return "—"
    return f"{100 * m:+.2f} ± {100 * s:.2f} (n={n})" if np.isfinite(s) else f"{100 * m:+.2f} (n={n})"


def conclusion(table: pd.DataFrame) -> str:
    """The variant(s) where our KNOWN beats both its own shrink control (some KNOW row, at the
    row's factor) and tuned naive (know-lr vs naive-lr) by more than MARGIN_STDS paired stds
    over >= MIN_SEEDS seeds; otherwise that none does, with the closest variant's margins."""
    if table.empty:
        return "The study has no finished variant, so there is nothing to conclude."
    scored = [(*_scores(rec), rec) for rec in table.to_dict("records")]
    winners = [(z, which, rec) for z, which, rec in scored if z > MARGIN_STDS]
    rule = (f"more than {MARGIN_STDS:g} standard deviations of the paired difference over at least {MIN_SEEDS} "
            "seeds")
    if winners:
        names = "; ".join(f"{rec['variant']} ({which} vs its own shrink {_pts(rec, _col(which, 'shrink'))} points; "
                          f"know-lr vs naive-lr {_pts(rec, 'know_lr_vs_naive_lr')} points)" for _, which, rec in winners)
        return (f"Our KNOWN beats both its own shrink control and tuned naive by {rule} in: {names}. "
                f"{len(table)} variants were screened, so one passing variant can still be chance; repeat it on new "
                "seeds before believing it.")
    z, which, rec = max(scored, key=lambda t: t[0])
    if not np.isfinite(z):
        return (f"No variant beats both its own shrink control and tuned naive by {rule}; no variant has the seeds "
                f"and rows to be judged by that rule (it needs >= {MIN_SEEDS} seeds, KNOW x2/x8 with their shrink "
                "rows and know-lr with naive-lr).")
    which = which or "know ×2"
    return (f"No variant beats both its own shrink control and tuned naive by {rule}. The closest is "
            f"{rec['variant']}: {which} vs its own shrink control {_pts(rec, _col(which, 'shrink'))} points, "
            f"know-lr vs naive-lr {_pts(rec, 'know_lr_vs_naive_lr')} points (the smaller margin is {z:.1f} stds).")


def _col(which: str, control: str) -> str:
    return f"know_x{which.split('×')[-1]}_vs_{control}" if which else f"know_x2_vs_{control}"


def study_markdown(table: pd.DataFrame, title: str, notes: list[str] = ()) -> str:
    header = ["variant", "conv coherence", "L1 ours", "L1 official", "L1 identity", "L1 logfit", "naive (%)",
              "KNOW ×2 vs naive", "×2 vs own shrink", "×2 vs naive-lr", "KNOW ×8 vs naive", "×8 vs own shrink",
              "×8 vs naive-lr", "know-lr vs naive-lr", "probe ×2 vs naive", "seeds"]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    fmt = lambda v, spec: "—" if not np.isfinite(v) else format(v, spec)
    for rec in table.to_dict("records"):
        cells = [rec["variant"], fmt(rec["coherence_conv"], ".3f"), fmt(rec["l1_ours"], ".3e"),
                 fmt(rec["l1_official"], ".3e"), fmt(rec["l1_identity"], ".3e"), fmt(rec["l1_logfit"], ".3e"),
                 fmt(100 * rec["naive_acc"], ".2f")]
        for f in FACTORS:
            key = f"know_x{int(f)}"
            cells += [_pts(rec, f"{key}_vs_naive"), _pts(rec, f"{key}_vs_shrink"), _pts(rec, f"{key}_vs_naive_lr")]
        cells += [_pts(rec, "know_lr_vs_naive_lr") + (f" at ×{rec['know_lr_factor']:g}" if np.isfinite(
            rec["know_lr_factor"]) else ""), fmt(100 * rec["know_x2_probe_vs_naive"], "+.2f"), str(rec["n_seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Differences are paired, in points: mean ± sample std over the seeds both rows have. "
              "'own shrink' is Θ0 scaled per tensor by that KNOW prediction at the same factor; know-lr and "
              "naive-lr are both tuned on a validation split."]
    lines += [f"- {n}" for n in notes]
    lines += ["", f"**Conclusion.** {conclusion(table)}"]
    return "\n".join(lines) + "\n"


def plot_gain_vs_coherence(table: pd.DataFrame, title: str = "KNOW gain over its own shrink control"):
    """Per variant: KNOW ×2 and ×8 gain over their own shrink control (mean ± paired std, points)
    against the target trajectory's conv coherence. One colour per variant, named in the legend
    (variants often share one target, so text labels next to the points would overlap); points
    of one factor at nearly the same coherence are spread sideways a little, and the x axis
    says by how much. A factor with no finite value is left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x_all = table["coherence_conv"].to_numpy(float)
    finite = x_all[np.isfinite(x_all)]
    span = float(finite.max() - finite.min()) if finite.size > 1 else 0.0
    step = 0.012 * (span or 1.0)  # sideways spread between points at one coherence
    colours = [f"C{i % 10}" for i in range(len(table))]
    spread = False
    for f, marker in zip(FACTORS, ("o", "s")):
        key = f"know_x{int(f)}_vs_shrink"
        if key not in table or not np.isfinite(table[key].to_numpy(float)).any():
            continue
        y, e = 100 * table[key].to_numpy(float), 100 * table[f"{key}_std"].fillna(0).to_numpy(float)
        shown = [i for i in range(len(table)) if np.isfinite(x_all[i]) and np.isfinite(y[i])]
        for i in shown:
            near = [j for j in shown if abs(x_all[j] - x_all[i]) < step]
            offset = (near.index(i) - (len(near) - 1) / 2) * step
            spread |= offset != 0
            ax.errorbar(x_all[i] + offset, y[i], yerr=e[i], fmt=marker, color=colours[i], capsize=3,
                        label=f"{table['variant'].iloc[i]} (×{int(f)})")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    note = f"; points at equal coherence spread by {step:.3f}" if spread else ""
    ax.set_xlabel(f"target trajectory conv coherence (mean cosine of consecutive steps{note})", fontsize=8)
    ax.set_ylabel("Δ fine-tune accuracy vs own shrink (points)")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


__all__ = ["study_table", "conclusion", "study_markdown", "plot_gain_vs_coherence", "FACTORS", "MARGIN_STDS",
           "MIN_SEEDS"]
