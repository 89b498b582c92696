"""The text of a KNOW run's report (method.md §6-7): the summary as markdown and the verdict.

Pure functions of the table that ``know_core.stats.summarize`` returns; no files
(``storage.results.save_text`` writes the markdown).

What lives here:
    summary_markdown   the summary as a readable markdown table + notes + verdict
    verdict            honest markdown on the KNOW rows: the best row of each source
                       (ours: know/know-lr; official: official/official-lr) against naive,
                       naive-lr and its OWN shrink control, the tuned headline (know-lr /
                       official-lr vs naive-lr) and a list judging every KNOW row
    know_source        which KNOW source a method belongs to ("ours", "official", None)
    fmt_factor         a factor as the report writes it ("×2", "×0.5"), shared with plots

Accuracies are shown in %, paired differences in percentage points:
``+0.31 ± 0.20 (4/5)`` is the mean ± sample std of the per-seed differences, then wins /
paired seeds; "—" = no data.  "Δ vs own shrink" is the row against its own shrink control
(``stats.own_shrink``: shrink for know, shrink-official for official, shrink-<p> otherwise)
at the same factor.

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
    'Best KNOW row (ours): know ×2 (fine-tune 91.30 ± 0.26 %, 4 seeds)'
    >>> "it beats shrink ×2 (+1.10 ± 0.26 points, better on 4/4 seeds)" in text
    True
    >>> [line for line in text.splitlines() if line.startswith("- ")]
    ['- know ×2: beats naive (+1.30 ± 0.26, 4/4); beats naive-lr (+1.30 ± 0.26, 4/4); beats shrink ×2 (+1.10 ± 0.26, 4/4)']
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .stats import CONTROLS, OWN_SHRINK, own_shrink

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
        "Δ vs own shrink", "probe acc (%)", "probe Δ vs naive",
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
        "mean ± sample std (wins / paired seeds). naive and naive-lr are taken at ×1. "
        "Δ vs own shrink compares each row with its own shrink control (shrink-<predictor>, "
        "Θ0 scaled per tensor by that predictor's prediction; shrink for know, "
        "shrink-official for official) at the same factor; controls and tuned rows (-lr) have "
        "none. — = no data."
    )
    notes = list(notes)
    if notes:
        lines.append("")
        lines.extend(f"- {note}" for note in notes)
    if include_verdict:
        lines += ["", f"**Verdict.** {verdict(summary)}"]
    return "\n".join(lines) + "\n"


def _assess(row: Mapping, name: str) -> dict:
    """The paired statistics of ``name`` (e.g. "ft_vs_naive") in ``row`` and the screen's
    outcome: status "none" (no paired seeds), "single", "beats", "worse" (mean <= 0) or
    "unclear" (positive mean within one std, or wins on too few seeds)."""
    n = int(row.get(f"{name}_n", 0) or 0)
    mean = row.get(f"{name}_mean", math.nan)
    std = row.get(f"{name}_std", math.nan)
    out = {"n": n, "mean": mean, "std": std, "wins": 0, "status": "none"}
    if n == 0 or not np.isfinite(mean):
        return out
    out["wins"] = int(row.get(f"{name}_wins", 0))
    if n < 2:
        out["status"] = "single"
    elif mean > 0 and out["wins"] > n / 2 and np.isfinite(std) and mean > std:
        out["status"] = "beats"
    elif mean <= 0:
        out["status"] = "worse"
    else:
        out["status"] = "unclear"
    return out


_FLAG = {"beats": True, "worse": False, "unclear": False, "single": None, "none": None}


def _judge(row: Mapping, name: str, control: str) -> tuple[str, bool | None]:
    """('beats naive (+1.15 ± 0.10 points, better on 5/5 seeds)', True/False/None=unknown)."""
    a = _assess(row, name)
    if a["status"] == "none":
        return f"cannot be compared with {control} (no paired seeds)", None
    spread = f" ± {100 * a['std']:.2f}" if np.isfinite(a["std"]) else ""
    stats = f"{100 * a['mean']:+.2f}{spread} points, better on {a['wins']}/{a['n']} seeds"
    if a["status"] == "single":
        return f"cannot be judged against {control} from a single paired seed ({stats})", None
    if a["status"] == "beats":
        return f"beats {control} ({stats})", True
    if a["status"] == "worse":
        return f"does not beat {control} ({stats}; not better on average)", False
    why = ("the mean gain is within one std" if not (a["mean"] > a["std"])
           else "it wins on too few seeds")
    return f"does not clearly beat {control} ({stats}; {why})", False


def _judge_short(row: Mapping, name: str, control: str) -> str:
    """The compact form of :func:`_judge`: 'beats naive (+1.15 ± 0.10, 5/5)'."""
    a = _assess(row, name)
    if a["status"] == "none":
        return f"no paired seeds with {control}"
    spread = f" ± {100 * a['std']:.2f}" if np.isfinite(a["std"]) else ""
    stats = f"{100 * a['mean']:+.2f}{spread}, {a['wins']}/{a['n']}"
    verb = {"single": "one paired seed only vs", "beats": "beats", "worse": "does not beat",
            "unclear": "does not clearly beat"}[a["status"]]
    return f"{verb} {control} ({stats})"


def know_source(method: str) -> str | None:
    """'ours' for know, know-lr and the S-ablations know-s<k>; 'official' for official and
    official-lr; None for every other method."""
    m = str(method)
    if m == "official" or m.startswith("official-"):
        return "official"
    if m == "know" or m.startswith("know-"):
        return "ours"
    return None


def _is_s_ablation(method: str) -> bool:
    return bool(_S_ABLATION.match(str(method)))


def _label(row: Mapping) -> str:
    return f"{row['method']} {fmt_factor(row['factor'])}"


def _has_row(summary: pd.DataFrame, method: str, factor: float) -> bool:
    sel = (summary["method"] == method) & np.isclose(summary["factor"].astype(float), float(factor))
    return bool(sel.any())


def _own_shrink_of(row: Mapping) -> str | None:
    name = row.get("shrink_control")
    if isinstance(name, str) and name:
        return name
    return own_shrink(row["method"])  # also covers a summary read back from CSV ("" -> NaN)


def _against(summary: pd.DataFrame, row: Mapping, control: str, prefix: str
             ) -> tuple[str, str, bool | None]:
    """(long text, compact text, flag) for ``row`` against ``control`` (a CONTROLS key;
    "shrink" = the row's own shrink control at the row's factor)."""
    factor = CONTROLS.get(control)
    if control == OWN_SHRINK:
        name = _own_shrink_of(row)
        if name is None:
            if str(row["method"]).endswith("-lr"):
                why = "tuned row; an untuned shrink start would not be a fair comparison"
                return f"has no shrink control ({why})", "no shrink control (tuned row)", None
            return "has no shrink control", "no shrink control", None
    else:
        name = control
    at = float(row["factor"]) if factor is None else float(factor)
    label = f"{name} {fmt_factor(at)}" if factor is None else name
    if not _has_row(summary, name, at):
        return f"has no {label} row to be compared with", f"no {label} row", None
    text, flag = _judge(row, f"{prefix}_vs_{control}", label)
    return text, _judge_short(row, f"{prefix}_vs_{control}", label), flag


def _score(rows: pd.DataFrame) -> pd.Series:
    return rows["ft_mean"].where(rows["ft_mean"].notna(), rows["probe_mean"])


def _best_paragraph(summary: pd.DataFrame, source: str, cand: pd.DataFrame,
                    controls: Sequence[str]) -> str:
    score = _score(cand)
    if score.notna().sum() == 0:
        return (f"The KNOW rows of source {source} have neither fine-tune nor probe "
                "accuracies, so there is nothing to judge.")
    best = cand.loc[score.idxmax()].to_dict()
    label = _label(best)
    head = (f"Best KNOW row ({source}): {label} (fine-tune "
            f"{_fmt_acc(best['ft_mean'], best['ft_std'])} %, {int(best['n_seeds'])} seeds")
    if len(cand) > 1:
        head += (f"; chosen as the best of {len(cand)} rows of this source by mean accuracy, "
                 "so its margins are optimistic")
    parts = [head + ")."]
    ft = {}
    for prefix, what in (("ft", "On fine-tuning"), ("probe", "On the linear probe")):
        if prefix == "probe" and int(best.get("probe_n_seeds", 0) or 0) == 0:
            parts.append("There is no probe result for this row.")
            continue
        judged = [_against(summary, best, c, prefix) for c in controls]
        if prefix == "ft":
            ft = dict(zip(controls, judged))
        parts.append(f"{what} it " + "; it ".join(text for text, _, _ in judged) + ".")
    if OWN_SHRINK in ft:
        if _own_shrink_of(best) is None:
            # a tuned row: judge the best untuned row of the source against its own shrink
            untuned = cand[[_own_shrink_of(r) is not None for r in cand.to_dict("records")]]
            u_score = _score(untuned)
            if u_score.notna().any():
                row = untuned.loc[u_score.idxmax()].to_dict()
                text, _, flag = _against(summary, row, OWN_SHRINK, "ft")
                parts.append(f"The best untuned row of this source, {_label(row)}, {text}.")
                parts.append(_shrink_sentence(row, flag))
        else:
            parts.append(_shrink_sentence(best, ft[OWN_SHRINK][2]))
    return " ".join(parts)


def _shrink_sentence(row: Mapping, flag: bool | None) -> str:
    ctrl_label = f"{_own_shrink_of(row)} {fmt_factor(row['factor'])}"
    label = _label(row)
    if flag is True:
        return f"Its fine-tuning gain survives the shrink control ({ctrl_label}) at this factor."
    if flag is False:
        return (f"So {label} does not show a gain beyond shrinking Θ0 towards its prediction "
                f"({ctrl_label}, the shrink control, method §6).")
    return (f"Without a {ctrl_label} comparison this run cannot show that {label} adds more "
            "than shrinking Θ0 (method §6).")


def _tuned_headline(summary: pd.DataFrame) -> str | None:
    tuned = ("know-lr", "official-lr")
    if not summary["method"].isin(tuned).any():
        return None
    texts = []
    for m in tuned:
        rows = summary[summary["method"] == m]
        if rows.empty:
            texts.append(f"no {m} row")
            continue
        score = _score(rows)
        row = (rows.loc[score.idxmax()] if score.notna().any() else rows.iloc[0]).to_dict()
        long, _, _ = _against(summary, row, "naive-lr", "ft")
        texts.append(f"{_label(row)} {long}")
    return "After both are tuned: " + "; ".join(texts) + "."


def verdict(summary: pd.DataFrame, controls: Sequence[str] | None = None) -> str:
    """Markdown on the KNOW rows: the best row of each source, the tuned headline, every KNOW
    row in a list, and the caveat.

    Sources: "ours" (know, know-lr; the S-ablations know-s<k> are listed but never "best")
    and "official" (official, official-lr).  Each source's best row (the highest mean
    fine-tune accuracy, probe accuracy if there is none) is judged against naive, naive-lr
    and its OWN shrink control at its factor (``stats.own_shrink``: shrink-official for
    official); being a maximum over several rows, its margins are optimistic.  When the tuned
    rows exist, "After both are tuned: know-lr ... naive-lr ..., official-lr ... naive-lr
    ..." answers the headline question.  Then every KNOW row gets a compact fine-tune
    judgement against each control ("no <control> row" where the control was not run).

    "beats <control>" needs, over the paired seeds, a positive mean difference larger than
    its sample std and wins on more than half of them; anything less is reported as "does
    not beat" / "does not clearly beat".  This is a screen over a handful of seeds, not a
    significance test, and the text says so.
    """
    controls = list(CONTROLS if controls is None else controls)
    source = summary["method"].map(know_source)
    rows = summary[source.notna()]
    if rows.empty:
        return "No KNOW rows in this run, so there is nothing to judge."
    paragraphs = []
    for src in ("ours", "official"):
        in_src = rows[rows["method"].map(know_source) == src]
        cand = in_src[~in_src["method"].map(_is_s_ablation)]
        if not cand.empty:
            paragraphs.append(_best_paragraph(summary, src, cand, controls))
    headline = _tuned_headline(summary)
    if headline:
        paragraphs.append(headline)
    names = ", ".join("its own shrink control at its factor" if c == OWN_SHRINK else c
                      for c in controls)
    bullets, judged = [], []
    for row in rows.to_dict("records"):
        res = [_against(summary, row, c, "ft") for c in controls]
        tag = " (S ablation)" if _is_s_ablation(row["method"]) else ""
        bullets.append(f"- {_label(row)}{tag}: " + "; ".join(short for _, short, _ in res))
        if OWN_SHRINK in controls:
            judged.append(res[controls.index(OWN_SHRINK)][2])
    intro = f"Every KNOW row on fine-tuning, against {names} (points, wins/paired seeds):"
    known = [f for f in judged if f is not None]
    if known:
        intro = (f"{intro[:-1]}; {sum(known)} of the {len(known)} rows with a paired own shrink "
                 "control beat it (several comparisons, so a single win can be chance):")
    paragraphs.append(intro + "\n\n" + "\n".join(bullets))
    paragraphs.append("'Beats' here means a positive mean paired difference larger than its "
                      "std with wins on most seeds: a screen over few seeds, not a significance "
                      "test.")
    return "\n\n".join(paragraphs)


__all__ = ["fmt_factor", "know_source", "summary_markdown", "verdict"]
