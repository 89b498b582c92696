"""know_core.stats / verdict / plots and storage.results on synthetic tables with known answers."""
from __future__ import annotations

import doctest
import math
import os

import numpy as np
import pandas as pd
import pytest

from know_core import methods, plots, verdict as verdict_module
from know_core import stats as report
from know_core.plots import plot_accuracy_vs_factor, plot_learning_curves
from know_core.stats import final_accuracy, paired_bootstrap_ci, summarize
from know_core.verdict import summary_markdown, verdict
from storage.results import load_table, save_figure, save_table, save_text

NAIVE = [0.90, 0.91, 0.92, 0.93, 0.94]  # final accuracy per seed 0..4
EPOCHS = 4  # phase 1: epochs 1-2, phase 2: epochs 3-4


def _curve(rows, method, factor, seed, final):
    for epoch in range(1, EPOCHS + 1):
        rows.append(dict(method=method, factor=float(factor), seed=seed, epoch=epoch,
                         phase=1 if epoch <= 2 else 2,
                         test_acc=final - 0.05 * (EPOCHS - epoch),  # last epoch = final
                         test_loss=1.0 - final, train_loss=0.5, wall_s=2.0))


@pytest.fixture(scope="module")
def tables():
    rows, probe = [], []
    know2 = [a + 0.01 for a in NAIVE]
    know2[4] = NAIVE[4] - 0.01  # better than naive on 4 of 5 seeds
    per_method = {
        ("naive", 1): NAIVE,
        ("naive-lr", 1): [a + 0.005 for a in NAIVE],
        ("shrink", 2): [a + 0.02 for a in NAIVE],  # shrink only at x2
        ("know", 2): know2,
        ("know", 4): [a + 0.03 for a in NAIVE],  # no shrink at x4
        ("know-s2", 2): [a + 0.05 for a in NAIVE],  # S-ablation: never the "best KNOW"
    }
    for (method, factor), accs in per_method.items():
        for seed, acc in enumerate(accs):
            _curve(rows, method, factor, seed, acc)
            probe.append(dict(method=method, factor=float(factor), seed=seed,
                              acc=acc - 0.1, loss=0.4))
    # unpaired seeds: know x2 seed 7 (no control has seed 7) must not change the paired stats
    _curve(rows, "know", 2, 7, 0.50)
    probe.append(dict(method="know", factor=2.0, seed=7, acc=0.2, loss=0.4))
    results = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # order must not matter
    return results, pd.DataFrame(probe)


@pytest.fixture(scope="module")
def summary(tables):
    results, probe = tables
    return summarize(results, probe)


def _row(summary, method, factor):
    sel = summary[(summary.method == method) & (summary.factor == factor)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_final_accuracy_takes_last_epoch(tables):
    results, _ = tables
    fa = final_accuracy(results)
    assert list(fa.columns) == ["method", "factor", "seed", "acc"]
    assert len(fa) == 5 * 6 + 1
    naive = fa[fa.method == "naive"].sort_values("seed")
    np.testing.assert_allclose(naive.acc, NAIVE)
    # the last epoch wins even if it is NaN (no silent fallback to an earlier epoch)
    r = results.copy()
    last = (r.method == "naive") & (r.seed == 0) & (r.epoch == EPOCHS)
    r.loc[last, "test_acc"] = np.nan
    assert math.isnan(final_accuracy(r).query("method == 'naive' and seed == 0").acc.iloc[0])


def test_summary_means_stds_and_order(summary):
    # each predictor sits next to its own shrink control (know, then shrink)
    assert list(zip(summary.method, summary.factor)) == [
        ("naive", 1.0), ("naive-lr", 1.0), ("know-s2", 2.0),
        ("know", 2.0), ("know", 4.0), ("shrink", 2.0)]
    assert list(summary.shrink_control) == ["", "", "shrink-know-s2", "shrink", "shrink", ""]
    naive = _row(summary, "naive", 1.0)
    assert naive.n_seeds == 5
    assert naive.ft_mean == pytest.approx(np.mean(NAIVE))
    assert naive.ft_std == pytest.approx(np.std(NAIVE, ddof=1))
    assert naive.probe_mean == pytest.approx(np.mean(NAIVE) - 0.1)
    # a control is not compared with itself
    assert math.isnan(naive.ft_vs_naive_mean) and naive.ft_vs_naive_n == 0
    assert math.isnan(naive.ft_vs_naive_wins)
    lr = _row(summary, "naive-lr", 1.0)
    assert lr.ft_vs_naive_mean == pytest.approx(0.005)
    assert lr.ft_vs_naive_std == pytest.approx(0.0, abs=1e-12)
    assert lr.ft_vs_naive_wins == 5


def test_paired_differences_wins_and_unpaired_seed(summary):
    know = _row(summary, "know", 2.0)
    assert know.n_seeds == 6  # seed 7 counts for the plain mean ...
    assert know.ft_mean == pytest.approx(np.mean([a + 0.01 for a in NAIVE[:4]] + [0.93, 0.50]))
    diffs = np.array([0.01, 0.01, 0.01, 0.01, -0.01])  # ... but not for any paired stat
    assert know.ft_vs_naive_n == 5
    assert know.ft_vs_naive_mean == pytest.approx(diffs.mean())
    assert know.ft_vs_naive_std == pytest.approx(diffs.std(ddof=1))
    assert know.ft_vs_naive_wins == 4
    assert know["ft_vs_naive-lr_mean"] == pytest.approx((diffs - 0.005).mean())
    assert know["ft_vs_naive-lr_wins"] == 4
    # shrink at the same factor (x2): know loses on every seed
    assert know.ft_vs_shrink_n == 5
    assert know.ft_vs_shrink_mean == pytest.approx((diffs - 0.02).mean())
    assert know.ft_vs_shrink_wins == 0
    # probe: same structure, shifted by the same 0.1 -> same diffs
    assert know.probe_n_seeds == 6
    assert know.probe_vs_naive_mean == pytest.approx(diffs.mean())
    assert know.probe_vs_naive_wins == 4
    # bootstrap CI brackets the mean
    assert know.ft_vs_naive_ci_lo <= know.ft_vs_naive_mean <= know.ft_vs_naive_ci_hi


def test_missing_shrink_at_factor_is_nan(summary):
    know4 = _row(summary, "know", 4.0)
    assert know4.ft_vs_naive_mean == pytest.approx(0.03)
    assert know4.ft_vs_shrink_n == 0
    for col in ("ft_vs_shrink_mean", "ft_vs_shrink_std", "ft_vs_shrink_wins",
                "ft_vs_shrink_ci_lo", "probe_vs_shrink_mean"):
        assert math.isnan(know4[col]), col


def test_one_seed_std_nan_and_no_probe():
    rows = []
    _curve(rows, "naive", 1, 0, 0.9)
    _curve(rows, "know", 2, 0, 0.95)
    s = summarize(pd.DataFrame(rows))  # no probe table: columns exist, NaN
    know = _row(s, "know", 2.0)
    assert know.n_seeds == 1 and math.isnan(know.ft_std)
    assert know.ft_vs_naive_mean == pytest.approx(0.05) and math.isnan(know.ft_vs_naive_std)
    assert math.isnan(know.ft_vs_naive_ci_lo)  # < 3 seeds: no bootstrap
    assert know.probe_n_seeds == 0 and math.isnan(know.probe_mean)
    md = summary_markdown(s, "one seed")
    assert "| know | ×2 | 1 | 95.00 | +5.00 (1/1) |" in md
    assert "single paired seed" in verdict(s)


def test_paired_bootstrap_ci_graceful():
    assert all(math.isnan(v) for v in paired_bootstrap_ci([0.1, 0.2]))
    assert paired_bootstrap_ci([0.01, 0.01, 0.01]) == (0.01, 0.01)
    lo, hi = paired_bootstrap_ci([0.01, 0.02, 0.03, 0.015, 0.025])
    assert 0.01 <= lo < 0.02 < hi <= 0.03


def test_markdown(summary):
    md = summary_markdown(summary, "Synthetic run", notes=["CPU scale", "r = 0.5"])
    assert md.startswith("## Synthetic run\n")
    assert ("| method | factor | seeds | fine-tune acc (%) | Δ vs naive | Δ vs naive-lr | "
            "Δ vs own shrink |") in md
    assert "its own shrink control (shrink-<predictor>" in md and "tuned rows (-lr)" in md
    # know x2: mean of the 6 seeds; diffs +0.60 ± 0.89 points vs naive, won on 4/5
    diffs = np.array([1, 1, 1, 1, -1.0])
    exp_naive = f"+{diffs.mean():.2f} ± {diffs.std(ddof=1):.2f} (4/5)"
    exp_shrink = f"{(diffs - 2).mean():+.2f} ± {diffs.std(ddof=1):.2f} (0/5)"
    line = next(l for l in md.splitlines() if l.startswith("| know | ×2 |"))
    assert exp_naive in line and exp_shrink in line
    assert line.split(" | ")[2] == "6"
    line4 = next(l for l in md.splitlines() if l.startswith("| know | ×4 |"))
    assert "+3.00 ± 0.00 (5/5)" in line4 and line4.count("—") == 1  # Δ vs shrink missing
    assert "- CPU scale\n- r = 0.5" in md
    assert "**Verdict.**" in md


def test_verdict_loses_to_shrink(summary):
    text = verdict(summary)
    # best KNOW row by fine-tune mean is know x4 (know-s2 is an S-ablation, excluded)
    assert text.startswith("Best KNOW row (ours): know ×4")
    assert "chosen as the best of 2 rows" in text and "optimistic" in text
    assert "it has no shrink ×4 row" in text  # no shrink at x4: said, not invented
    assert "Best KNOW row (official)" not in text  # no official rows in this run
    # restricted to the x2 row, which loses to shrink on every seed
    only2 = summary[~((summary.method == "know") & (summary.factor == 4.0))]
    text2 = verdict(only2)
    assert text2.startswith("Best KNOW row (ours): know ×2")
    best2 = text2.split("\n\n")[0]  # the best row's paragraph
    assert "it does not beat shrink ×2" in best2
    assert "beats naive" not in best2  # 4/5 wins but the mean (+0.6) is within one std (0.89)
    assert "does not clearly beat naive" in best2
    assert "does not show a gain beyond shrinking" in best2
    # every KNOW row is listed, the S ablation included (it beats naive by +5 on every seed)
    bullets = [l for l in text2.splitlines() if l.startswith("- ")]
    assert [b.split(":")[0] for b in bullets] == ["- know-s2 ×2 (S ablation)", "- know ×2"]
    assert "beats naive (+5.00 ± 0.00, 5/5)" in bullets[0]
    assert "no shrink-know-s2 ×2 row" in bullets[0]
    assert "does not beat shrink ×2 (-1.40 ± 0.89, 0/5)" in bullets[1]
    assert text2.endswith("not a significance test.")
    assert verdict(summary[summary.method == "naive"]).startswith("No KNOW rows")


def test_verdict_beats():
    rows = []
    for seed in range(5):
        _curve(rows, "naive", 1, seed, 0.90 + 0.001 * seed)
        _curve(rows, "shrink", 8, seed, 0.905 + 0.001 * seed)
        _curve(rows, "know", 8, seed, 0.92 + 0.0012 * seed)
    text = verdict(summarize(pd.DataFrame(rows)))
    assert "it beats naive (+2.04 ± 0.03 points, better on 5/5 seeds)" in text
    assert "it beats shrink ×8" in text and "survives the shrink control (shrink ×8)" in text
    assert "no probe result" in text


def test_plots_and_save_figure(tables, tmp_path):
    results, _ = tables
    for name, fig in [("acc.png", plot_accuracy_vs_factor(results)),
                      ("curves.png", plot_learning_curves(results))]:
        path = save_figure(fig, tmp_path / "figs" / name)
        assert path.stat().st_size > 0
        from PIL import Image

        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    ax = plot_accuracy_vs_factor(results).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["×1", "×2", "×4"]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
    assert any(line.get_linestyle() == "--" for line in ax.get_lines())  # naive: dashed line
    curves = plot_learning_curves(results).axes[0]
    assert any(tuple(line.get_xdata()) == (2.5, 2.5) for line in curves.get_lines())
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["acc.png", "curves.png"]


def test_tables_and_text_round_trip_atomically(summary, tmp_path):
    path = save_table(summary, tmp_path / "out" / "summary.csv")
    back = load_table(path)
    # CSV cannot tell "" from a missing value: shrink_control "" (controls) comes back as NaN
    assert back.shrink_control.isna().tolist() == (summary.shrink_control == "").tolist()
    back["shrink_control"] = back["shrink_control"].fillna("")
    pd.testing.assert_frame_equal(back, summary, check_dtype=False)
    assert verdict(load_table(path)) == verdict(summary)  # the verdict reads a loaded summary
    md = summary_markdown(summary, "t")
    assert save_text(md, tmp_path / "out" / "summary.md").read_text(encoding="utf-8") == md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv", "summary.md"]


def test_interrupted_write_leaves_old_file_and_no_tmp(tmp_path):
    path = save_text("old", tmp_path / "report.md")

    class Boom(Exception):
        pass

    class Bad(pd.DataFrame):
        def to_csv(self, *a, **k):  # fails half-way through writing
            a[0].write("half,")
            raise Boom

    with pytest.raises(Boom):
        save_table(Bad({"a": [1]}), tmp_path / "report.md")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.md"]


def test_report_imports_no_matplotlib_eagerly():
    import subprocess
    import sys

    code = ("import sys, know_core.stats, know_core.verdict, know_core.plots, storage.results; "
            "print(any(m.startswith('matplotlib') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False"


def test_module_docstring_example_runs():
    assert doctest.testmod(report, raise_on_error=False).failed == 0


@pytest.mark.parametrize("module", [verdict_module, plots, methods], ids=lambda m: m.__name__)
def test_other_module_docstring_examples_run(module):  # stats: test_module_docstring_example_runs
    res = doctest.testmod(module, raise_on_error=False)
    assert res.attempted > 0 and res.failed == 0


# --- every predictor against its own shrink control; the verdict per KNOW source ---------

OFFICIAL_RUN = {  # final accuracy per seed 0..4 (None: that seed was not run)
    ("naive", 1): NAIVE,
    ("naive-lr", 1): [a + 0.002 for a in NAIVE],
    ("shrink", 8): [a + 0.010 for a in NAIVE],
    ("know", 8): [a + 0.015 + 0.001 * s for s, a in enumerate(NAIVE)],
    ("official", 8): [a + 0.020 + 0.001 * s for s, a in enumerate(NAIVE)],  # > shrink ...
    ("shrink-official", 8): [a + 0.030 for a in NAIVE[:4]] + [None],  # ... < shrink-official
    ("taskvector", 2): [a + 0.004 for a in NAIVE],  # no shrink-taskvector row
    ("know-lr", 8): [a + 0.016 + 0.001 * s for s, a in enumerate(NAIVE)],
    ("official-lr", 8): [a + 0.001 * (-1) ** s for s, a in enumerate(NAIVE)],
}


def _summary_of(per_method, probe=False):
    rows, pr = [], []
    for (method, factor), accs in per_method.items():
        for seed, acc in enumerate(accs):
            if acc is not None:
                _curve(rows, method, factor, seed, acc)
                pr.append(dict(method=method, factor=float(factor), seed=seed, acc=acc - 0.1,
                               loss=0.4))
    return summarize(pd.DataFrame(rows), pd.DataFrame(pr) if probe else None)


def _paragraph(text, start):
    return next(p for p in text.split("\n\n") if p.startswith(start))


def _bullet(text, label):
    return next(l for l in text.splitlines() if l.startswith(f"- {label}:"))


def test_own_shrink_names():
    assert report.own_shrink("know") == "shrink"
    assert report.own_shrink("official") == "shrink-official"
    for p in ("taskvector", "logfit", "know-s2", "know-s4", "something-new"):
        assert report.own_shrink(p) == f"shrink-{p}"
    for c in ("naive", "naive-lr", "naive-full", "scratch", "shrink", "shrink-official",
              "shrink-logfit", "know-lr", "official-lr"):
        assert report.own_shrink(c) is None, c
    assert report.CONTROLS == {"naive": 1.0, "naive-lr": 1.0, "shrink": None}
    assert "know-official" not in report.METHOD_ORDER
    for p in ("taskvector", "logfit", "know-s2", "know-s3", "know-s4", "know", "official"):
        i = report.METHOD_ORDER.index(p)
        assert report.METHOD_ORDER[i + 1] == report.own_shrink(p), p


def test_official_is_compared_with_shrink_official_not_shrink():
    s = _summary_of(OFFICIAL_RUN, probe=True)
    off = _row(s, "official", 8.0)
    assert off.shrink_control == "shrink-official"
    per_seed = np.array(OFFICIAL_RUN[("official", 8)][:4]) - np.array(
        OFFICIAL_RUN[("shrink-official", 8)][:4])  # seed 4 has no shrink-official: unpaired
    assert off.ft_vs_shrink_n == 4
    assert off.ft_vs_shrink_mean == pytest.approx(per_seed.mean())
    assert off.ft_vs_shrink_mean < 0  # although official is above know's shrink on every seed
    assert off.ft_vs_shrink_std == pytest.approx(per_seed.std(ddof=1))
    assert off.ft_vs_shrink_wins == 0
    assert off.probe_vs_shrink_mean == pytest.approx(per_seed.mean())
    assert (np.array(OFFICIAL_RUN[("official", 8)]) > np.array(OFFICIAL_RUN[("shrink", 8)])).all()
    know = _row(s, "know", 8.0)  # know keeps its own control, shrink
    assert know.shrink_control == "shrink"
    assert know.ft_vs_shrink_n == 5
    assert know.ft_vs_shrink_mean == pytest.approx(0.005 + 0.001 * np.mean(range(5)))
    # no own control row: the name is kept, the stats are missing
    tv = _row(s, "taskvector", 2.0)
    assert tv.shrink_control == "shrink-taskvector" and tv.ft_vs_shrink_n == 0
    assert math.isnan(tv.ft_vs_shrink_mean) and math.isnan(tv.probe_vs_shrink_mean)
    # tuned rows and controls have no shrink control, even with a shrink row at their factor
    for method, factor in [("know-lr", 8.0), ("official-lr", 8.0), ("shrink", 8.0),
                           ("shrink-official", 8.0), ("naive", 1.0)]:
        r = _row(s, method, factor)
        assert r.shrink_control == "" and r.ft_vs_shrink_n == 0, method
        assert math.isnan(r.ft_vs_shrink_mean), method
    # ... but they are still compared with naive
    assert _row(s, "shrink-official", 8.0).ft_vs_naive_mean == pytest.approx(0.03)
    assert list(s.method) == ["naive", "naive-lr", "taskvector", "know", "shrink", "know-lr",
                              "official", "shrink-official", "official-lr"]
    md = summary_markdown(s, "official run")
    line = next(l for l in md.splitlines() if l.startswith("| official | ×8 |"))
    assert f"{100 * per_seed.mean():+.2f} ± {100 * per_seed.std(ddof=1):.2f} (0/4)" in line
    line = next(l for l in md.splitlines() if l.startswith("| taskvector | ×2 |"))
    assert line.split(" | ")[6] == "—"


def test_verdict_names_best_row_of_each_source_and_its_own_control():
    text = verdict(_summary_of(OFFICIAL_RUN))
    ours = _paragraph(text, "Best KNOW row (ours): ")
    official = _paragraph(text, "Best KNOW row (official): ")
    # the best of each source by mean fine-tune accuracy, tuned rows included
    assert ours.startswith("Best KNOW row (ours): know-lr ×8")
    assert official.startswith("Best KNOW row (official): official ×8")
    assert "best of 2 rows of this source" in ours and "best of 2 rows" in official
    assert "optimistic" in official
    # official judged against shrink-official (not know's shrink)
    assert "it does not beat shrink-official ×8 (" in official
    assert "shrink ×8" not in official
    assert "does not show a gain beyond shrinking" in official
    assert "it beats naive (" in official
    # the tuned best row has no shrink control; its best untuned row is judged instead
    assert "has no shrink control (tuned row" in ours
    assert "The best untuned row of this source, know ×8, beats shrink ×8 (" in ours
    # every KNOW row is listed, none skipped; non-KNOW predictors are not
    bullets = [l for l in text.splitlines() if l.startswith("- ")]
    assert [b.split(":")[0][2:] for b in bullets] == ["know ×8", "know-lr ×8", "official ×8",
                                                      "official-lr ×8"]
    assert "does not beat shrink-official ×8 (" in _bullet(text, "official ×8")
    assert "beats shrink ×8 (" in _bullet(text, "know ×8")
    assert _bullet(text, "official-lr ×8").endswith("no shrink control (tuned row)")
    assert text.endswith("not a significance test.")
    # the official source alone: its own paragraph, no "ours"
    only = verdict(_summary_of({k: v for k, v in OFFICIAL_RUN.items()
                                if not k[0].startswith("know")}))
    assert only.startswith("Best KNOW row (official): official ×8")
    assert "(ours)" not in only


def test_know_and_shrink_at_the_same_factor_are_compared(tmp_path):
    s = _summary_of({("naive", 1): NAIVE, ("naive-lr", 1): NAIVE,
                     ("shrink", 2): [a + 0.004 for a in NAIVE],
                     ("know", 2): [a + 0.010 + 0.001 * i for i, a in enumerate(NAIVE)]})
    for summary in (s, load_table(save_table(s, tmp_path / "s.csv"))):  # also read back
        text = verdict(summary)
        assert "cannot be compared" not in text and "no shrink" not in text
        assert "it beats shrink ×2 (+0.80 ± 0.16 points, better on 5/5 seeds)" in text
        assert _bullet(text, "know ×2").endswith("beats shrink ×2 (+0.80 ± 0.16, 5/5)")


def test_tuned_headline_know_lr_and_official_lr_vs_naive_lr():
    text = verdict(_summary_of(OFFICIAL_RUN))
    head = _paragraph(text, "After both are tuned: ")
    assert head.startswith("After both are tuned: know-lr ×8 beats naive-lr (")
    assert "; official-lr ×8 does not beat naive-lr (" in head
    # only one tuned row: the other is reported missing, not invented
    one = verdict(_summary_of({k: v for k, v in OFFICIAL_RUN.items() if k[0] != "official-lr"}))
    assert "After both are tuned: know-lr ×8 beats naive-lr (" in one and "no official-lr row" in one
    # no tuned rows: no headline
    assert "After both are tuned" not in verdict(
        _summary_of({k: v for k, v in OFFICIAL_RUN.items() if not k[0].endswith("-lr") or
                     k[0] == "naive-lr"}))


def test_predictor_without_its_control_row_says_so():
    run = {("naive", 1): NAIVE, ("shrink", 8): [a + 0.01 for a in NAIVE],
           ("official", 8): [a + 0.02 for a in NAIVE],
           ("know-s3", 4): [a + 0.01 for a in NAIVE]}
    text = verdict(_summary_of(run))
    official = _paragraph(text, "Best KNOW row (official): official ×8")
    assert "it has no shrink-official ×8 row" in official
    assert "it has no naive-lr row" in official
    assert "Without a shrink-official ×8 comparison" in official
    assert "shrink ×8" not in official  # know's control is not borrowed
    assert _bullet(text, "official ×8").endswith("no naive-lr row; no shrink-official ×8 row")
    assert _bullet(text, "know-s3 ×4 (S ablation)").endswith("no shrink-know-s3 ×4 row")
    assert "(ours)" not in text  # an S ablation alone is listed but never the best row
