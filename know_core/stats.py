"""Paired summaries of a KNOW run (method.md §6-7): final accuracies, per-(method, factor)
statistics against the controls, bootstrap CIs.

Pure functions of the two long tables that ``know run`` writes; no files, no pipeline objects
(``know_core.verdict`` turns the summary into text, ``know_core.plots`` into figures,
``storage.results`` writes what they return).

    results  one row per (method, factor, seed, epoch): method, factor, seed, epoch, phase,
             test_acc (0..1), test_loss, train_loss, wall_s
    probe    one row per (method, factor, seed): method, factor, seed, acc, loss

What lives here:
    final_accuracy            test_acc at the last epoch of every (method, factor, seed)
    summarize                 one row per (method, factor): mean/std over seeds, paired
                              differences against the controls, wins, bootstrap CIs
    own_shrink                the shrink control that belongs to a method ("shrink" for know,
                              "shrink-<p>" for any other predictor p, None for controls and
                              tuned "-lr" rows)
    paired_bootstrap_ci       percentile bootstrap CI of a mean paired difference
    KEYS, SEED_KEYS, CONTROLS, METHOD_ORDER, method_rank, sort_keys, check_columns
                              the tables' vocabulary, shared with verdict and plots (the
                              method-name rules live in know_core.methods, without pandas)

Method names.  Controls: ``naive``, ``naive-lr`` (naive with lr2 tuned on a validation
split), ``naive-full``, ``scratch`` and every ``shrink*`` row.  Predictors: ``know`` (ours),
``official`` (the authors' KNOWN), ``taskvector``, ``logfit``, the S-ablations ``know-s<k>``
and any other name.  Tuned KNOW rows: ``know-lr``, ``official-lr`` (the best start of that
source, fine-tuned with an lr chosen by the naive-lr rule).  Each predictor p has its own
shrink control, Θ0 scaled per tensor towards p's prediction: ``shrink`` for ``know``,
``shrink-official`` for ``official``, ``shrink-<p>`` otherwise (``shrink-taskvector``,
``shrink-know-s2``, ...).

Controls and pairing.  A method is compared with a control only on the seeds both have (a
paired difference per seed; unpaired seeds are ignored).  ``naive`` and ``naive-lr`` are
taken at factor 1 and compared with every row.  The ``shrink`` entry of :data:`CONTROLS`
means "the row's OWN shrink control" (:func:`own_shrink`, also written to the summary as
``shrink_control``), taken at the same factor as the row: ``official`` x8 is compared with
``shrink-official`` x8, never with ``shrink`` (know's control).  The ``ft_vs_shrink_*`` /
``probe_vs_shrink_*`` columns keep that name for every predictor; they are NaN (``_n`` = 0)
when the own control has no row at that factor, and for rows that have no own control at all
(controls, and the tuned ``-lr`` rows: their shrink control would be an untuned start, so the
comparison would not be fair).  A control is not compared with itself (NaN).  Differences
are reported in accuracy units (0..1); stds are sample stds (ddof=1, NaN for a single seed);
``wins`` counts paired seeds where the method is strictly better (NaN with no pair).

Example (runs as a doctest)::

    >>> import numpy as np, pandas as pd
    >>> rows = []
    >>> for seed in range(5):
    ...     for method, factor, acc in [("naive", 1, 0.900), ("naive-lr", 1, 0.902),
    ...                                 ("shrink", 2, 0.905), ("know", 2, 0.910),
    ...                                 ("shrink-official", 2, 0.915), ("official", 2, 0.912)]:
    ...         for epoch in (1, 2, 3):
    ...             rows.append(dict(method=method, factor=float(factor), seed=seed,
    ...                              epoch=epoch, phase=1 if epoch == 1 else 2,
    ...                              test_acc=acc - 0.01 * (3 - epoch) + 0.001 * seed,
    ...                              test_loss=0.3, train_loss=0.2, wall_s=1.0))
    >>> results = pd.DataFrame(rows)
    >>> summary = summarize(results)
    >>> cols = ["method", "factor", "n_seeds", "ft_mean", "shrink_control", "ft_vs_shrink_mean"]
    >>> print(summary[cols].round(4).to_string(index=False))
             method  factor  n_seeds  ft_mean  shrink_control  ft_vs_shrink_mean
              naive     1.0        5    0.902                                NaN
           naive-lr     1.0        5    0.904                                NaN
               know     2.0        5    0.912          shrink              0.005
             shrink     2.0        5    0.907                                NaN
           official     2.0        5    0.914 shrink-official             -0.003
    shrink-official     2.0        5    0.917                                NaN
    >>> know = summary[summary.method == "know"].iloc[0]
    >>> round(float(know.ft_vs_naive_mean), 4), int(know.ft_vs_naive_wins), int(know.ft_vs_shrink_n)
    (0.01, 5, 5)
    >>> official = summary[summary.method == "official"].iloc[0]   # vs ITS shrink, not know's
    >>> official.shrink_control, round(float(official.ft_vs_shrink_mean), 4)
    ('shrink-official', -0.003)
    >>> own_shrink("know"), own_shrink("official"), own_shrink("know-s2"), own_shrink("know-lr")
    ('shrink', 'shrink-official', 'shrink-know-s2', None)
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .methods import CONTROL_METHODS, CONTROLS, METHOD_ORDER, OWN_SHRINK, method_rank, own_shrink

KEYS = ["method", "factor"]
SEED_KEYS = ["method", "factor", "seed"]

def sort_keys(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df.reset_index(drop=True)
    order = df.assign(_rank=df["method"].map(method_rank))
    order = order.sort_values(["_rank", "method", "factor"], kind="stable")
    return order.drop(columns="_rank").reset_index(drop=True)


def check_columns(df: pd.DataFrame, needed: Iterable[str], name: str) -> None:
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
    check_columns(results, SEED_KEYS + ["epoch", "test_acc"], "results")
    df = _normalise_keys(results[SEED_KEYS + ["epoch", "test_acc"]])
    df = df.sort_values("epoch", kind="stable")
    last = df.drop_duplicates(SEED_KEYS, keep="last")
    out = last[SEED_KEYS + ["test_acc"]].rename(columns={"test_acc": "acc"})
    out = sort_keys(out.sort_values(SEED_KEYS, kind="stable"))
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
    """Per (method, factor): paired diffs method - control over the seeds both have.

    ``control`` == :data:`OWN_SHRINK` pairs each row with its own shrink control
    (:func:`own_shrink`); any other name is one fixed control method.  ``control_factor``
    None takes the control at the row's factor, else at that factor.
    """
    name = f"{prefix}_vs_{control}"
    if control == OWN_SHRINK:
        control_of = {m: own_shrink(m) for m in per_seed["method"].unique()}
    else:  # a control is not compared with itself
        control_of = {m: (None if m == control else control) for m in per_seed["method"].unique()}
    rows = per_seed.assign(_cname=per_seed["method"].map(control_of))
    rows = rows[rows["_cname"].notna()]
    ctrl = per_seed.rename(columns={"method": "_cname", value: "_ctrl"})
    if control_factor is not None:
        ctrl = ctrl[np.isclose(ctrl["factor"], control_factor)]
        on = ["_cname", "seed"]
    else:
        on = ["_cname", "factor", "seed"]
    ctrl = ctrl[on + ["_ctrl"]]
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
        method, factor, n_seeds, ft_mean, ft_std, shrink_control,
        for c in controls: ft_vs_<c>_n, _mean, _std, _wins[, _ci_lo, _ci_hi],
        probe_n_seeds, probe_mean, probe_std,
        for c in controls: probe_vs_<c>_n, _mean, _std, _wins

    ``ft`` is the final fine-tune accuracy (:func:`final_accuracy`), ``probe`` the probe
    ``acc``; both in 0..1.  ``_n`` is the number of paired seeds (0 when the control is
    missing, and then mean/std/wins are NaN).  ``ci`` adds percentile-bootstrap CIs of the
    fine-tune differences (needs >= 3 paired seeds, else NaN); ``ci=None`` skips them.
    Without ``probe`` the probe columns are present and NaN, so the schema never changes.

    ``controls`` maps a control to the factor its rows are taken at (None: the row's own
    factor); the key ``"shrink"`` means each row's own shrink control (:func:`own_shrink`) at
    the row's factor, so ``ft_vs_shrink_*`` of ``official`` is official - shrink-official.
    ``shrink_control`` names that control (whether or not it has a row at that factor; ""
    for rows that have none: controls and tuned ``-lr`` rows).  Note that a CSV round trip
    reads "" back as NaN.
    """
    controls = dict(CONTROLS if controls is None else controls)
    ft = final_accuracy(results).rename(columns={"acc": "ft"})
    ft = _per_seed(ft, "ft")
    parts = [_group_stats(ft, "ft", "ft", "n_seeds")]
    for c, cf in controls.items():
        parts.append(_paired_stats(ft, "ft", c, cf, "ft", ci, n_resamples, seed))

    if probe is not None and len(probe):
        check_columns(probe, SEED_KEYS + ["acc"], "probe")
        pr = _per_seed(probe.rename(columns={"acc": "probe"}), "probe")
    else:
        pr = pd.DataFrame({"method": pd.Series(dtype=str), "factor": pd.Series(dtype=float),
                           "seed": pd.Series(dtype=int), "probe": pd.Series(dtype=float)})
    parts.append(_group_stats(pr, "probe", "probe", "probe_n_seeds"))
    for c, cf in controls.items():
        parts.append(_paired_stats(pr, "probe", c, cf, "probe", None, n_resamples, seed))

    keys = pd.concat([ft[KEYS], pr[KEYS]]).drop_duplicates()
    out = keys.set_index(KEYS)
    for i, part in enumerate(parts):
        out = out.join(part, how="left")
        if i == 0:  # after n_seeds, ft_mean, ft_std
            methods = out.index.get_level_values("method")
            out["shrink_control"] = [own_shrink(m) or "" for m in methods]
    out = out.reset_index()
    for col in out.columns:
        if col == "shrink_control":
            out[col] = out[col].astype(str)
        elif col == "n_seeds" or col == "probe_n_seeds" or col.endswith("_n"):
            out[col] = out[col].fillna(0).astype(int)
        elif col not in KEYS:
            out[col] = out[col].astype(float)
    return sort_keys(out)


__all__ = [
    "KEYS",
    "SEED_KEYS",
    "CONTROLS",
    "OWN_SHRINK",
    "CONTROL_METHODS",
    "METHOD_ORDER",
    "own_shrink",
    "method_rank",
    "sort_keys",
    "check_columns",
    "final_accuracy",
    "paired_bootstrap_ci",
    "summarize",
]
