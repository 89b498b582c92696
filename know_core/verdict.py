"""The text of a KNOW run's report (method.md §6-7): the summary as markdown and the verdict.

Pure functions of the table that ``know_core.stats.summarize`` returns; no files
(``storage.results.save_text`` writes the markdown).

What lives here:
    summary_markdown   the summary as a readable markdown table + notes + verdict
    verdict            one honest paragraph about the best KNOW row
    fmt_factor         a factor as the report writes it ("×2", "×0.5"), shared with plots

Accuracies are shown in %, paired differences in percentage points:
``+0.31 ± 0.20 (4/5)`` is the mean ± sample std of the per-seed differences, then wins /
paired seeds; "—" = no data.

Example (runs as a doctest)::

    >>> import pandas as pd
    >>> from know_core.stats import summarize
    >>> rows = [dict(method=m, factor=f, seed=s, epoch=1, test_acc=a + 0.002 * s * (m == "know"))
    ...         for s in range(4)
    ...         for m, f, a in [("naive", 1.0, 0.90), ("naive-lr", 1.0, 0.90),
    ...                         ("shrink", 2.0, 0.902), ("know", 2.0, 0.91)]]
    >>> summary = summarize(pd.DataFrame(rows))
    >>> md = summary_markdown(summary, "Toy run", notes=["synthetic"])
    >>> md.splitlines()[0], "- synthetic" in md
    ('## Toy run', True)
    >>> [line for line in md.splitlines() if line.startswith("| know ")]
    ['| know | ×2 | 4 | 91.30 ± 0.26 | +1.30 ± 0.26 (4/4) | +1.30 ± 0.26 (4/4) | +1.10 ± 0.26 (4/4) | — | — |']
    >>> text = verdict(summary)
    >>> text.split(". ")[0]
    'Best KNOW row: know ×2 (fine-tune 91.30 ± 0.26 %, 4 seeds)'
    >>> "it beats shrink (+1.10 ± 0.26 points, better on 4/4 seeds)" in text
    True
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .stats import CONTROLS

_S_ABLATION = re.compile(r"^know-s\d+$")

_DASH = "—"


def fmt_factor(f: float) -> str:
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
            fmt_factor(row["factor"]),
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
    label = f"{best['method']} {fmt_factor(best['factor'])}"
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


__all__ = ["fmt_factor", "summary_markdown", "verdict"]
