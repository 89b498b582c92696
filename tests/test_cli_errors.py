"""`know collect` on bad input: exit code 2, one line on stderr, nothing marked complete.

All of these fail during validation, before any flow starts, so no Prefect server is needed.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import know_cli


def _complete_runs(store: Path) -> list[str]:
    if not store.is_dir():
        return []
    from storage.trajectory import TrajectoryStore

    df = TrajectoryStore(store).list_runs()
    return [] if df.empty else df[df.status == "complete"].run_id.tolist()


def _run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        know_cli.main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


CASES = {
    # field constraints of the stage model: the message names the option and the bound
    "r-above-one": (["--r", "1.5"], "--r 1.5: must be less than 1"),
    "r-min-zero": (["--r-min", "0"], "--r-min 0: must be greater than 0"),
    "one-stage": (["--stages", "1"], "--stages 1: must be at least 2"),
    # random sweep (the default): no r <= 0.5 gives 5 stages that hold a batch of 500
    "batch-too-large": (["--stages", "5", "--r", "0.5", "--batch-size", "500"], "with a batch of 500 at r <= 0.5"),
    "batch-too-large-grid": (["--sweep", "grid", "--stages", "5", "--r", "0.5", "--batch-size", "500"],
                             "batch size 500 is larger than the smallest subset"),
    "unknown-model": (["--models", "vgg99"], "unknown model 'vgg99'"),
    "unknown-dataset": (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_collect_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    args, expected = CASES[case]
    store = tmp_path / "runs.zarr"
    code, out, err = _run(["collect", "--store", str(store), "--runs", "1", *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert "Traceback" not in err + out
    assert _complete_runs(store) == []
    assert not store.exists() or not any(store.rglob("weights"))


@pytest.mark.parametrize("sweep, fix", [("random", "smaller batch size"), ("grid", "lower --batch-size")])
def test_batch_too_large_names_the_fix(sweep, fix, tmp_path, capsys):
    code, _, err = _run(["collect", "--store", str(tmp_path / "s"), "--sweep", sweep, "--stages", "5",
                         "--r", "0.5", "--batch-size", "500"], capsys)
    assert code == 2
    assert "1348 images" in err and fix in err


def test_collect_store_path_is_a_file(tmp_path, capsys):
    store = tmp_path / "runs.zarr"
    store.write_text("precious")
    code, out, err = _run(["collect", "--store", str(store), "--runs", "1", "--stages", "3"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "is a file" in lines[0] and str(store) in lines[0]
    assert store.read_text() == "precious"  # untouched


def test_runs_on_missing_store(tmp_path, capsys):
    code, _, err = _run(["runs", "--store", str(tmp_path / "none.zarr")], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err
    assert not (tmp_path / "none.zarr").exists()


def test_collect_help_documents_store(capsys):
    code, out, err = _run(["collect", "--help"], capsys)
    assert code == 0
    text = out + err
    assert "--store" in text
    assert "Trajectory store" in text  # the option's description, not only its name
    assert "--batch-size" in text
