"""Bring your own data to `know run` (issue 12): a TOML experiment on image folders, and the
paper preset at smoke scale on CIFAR-format python batches written here. Both are whole,
real experiments (meta-data, KNOWN, target trajectory, predictions, fine-tunes, report)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flows.experiment  # noqa: F401 - imported at collection (see test_experiment.py)
import know_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _image_folder(root: Path, classes: list[str], per_class: int, seed: int) -> Path:
    """root/{train,test}/<class>/<i>.png: 12x12 RGB images whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", max(per_class // 3, 4))):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((12, 12, 3)) + 40 * c
                img = np.clip(base + rng.normal(0, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def _cifar(root: Path, classes: int, n_train: int, n_test: int, seed: int) -> None:
    """Python batches in the CIFAR archive layout (cifar-10-batches-py / cifar-100-python)."""
    rng = np.random.default_rng(seed)
    key = b"labels" if classes == 10 else b"fine_labels"
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)

    def batch(n):
        y = np.arange(n) % classes
        x = (rng.integers(0, 60, (n, 3, 32, 32)) + 3 * y[:, None, None, None]).astype(np.uint8)
        return {b"data": x.reshape(n, -1), key: y.tolist()}

    names = [("data_batch_1", n_train), ("test_batch", n_test)] if classes == 10 else [("train", n_train),
                                                                                        ("test", n_test)]
    for name, n in names:
        with open(folder / name, "wb") as fh:
            pickle.dump(batch(n), fh)


def _finished(out: Path, methods: set[str]) -> None:
    import pandas as pd

    for name in ("results.csv", "summary.csv", "summary.md", "accuracy_vs_factor.png"):
        assert (out / name).is_file(), name
    summary = pd.read_csv(out / "summary.csv")
    assert methods <= set(summary.method), set(summary.method)
    assert summary.ft_mean.between(0, 1).all()


@pytest.mark.slow
def test_run_config_on_image_folders(tmp_path, capfd):
    source = _image_folder(tmp_path / "src", ["a", "b", "c"], 60, 0)
    target = _image_folder(tmp_path / "tgt", ["x", "y"], 30, 1)
    out = tmp_path / "out"
    config = tmp_path / "exp.toml"
    config.write_text(f'''# a custom experiment: the fields of `know run`
preset = "quick"
source_dataset = "image-folder"
source_data_dir = "{source}"
source_classes = ""
meta_dataset = "image-folder"
meta_data_dir = "{source}"
meta_classes = ""
meta_runs = 2
meta_epochs = 1
meta_pairs_per_run = 1000
target_dataset = "image-folder"
target_data_dir = "{target}"
target_classes = ""
target_train_size = 40
pretrain_epochs = 1
phase1_epochs = 1
phase2_epochs = 1
traj_batch_size = 2
methods = "naive,know:2,taskvector:2"
''')
    with pytest.raises(SystemExit) as exc:
        know_cli.main(["run", "--config", str(config), "--out", str(out), "--seeds", "1"])
    assert exc.value.code == 0, capfd.readouterr().err[-3000:]
    _finished(out, {"naive", "know", "shrink", "taskvector", "shrink-taskvector"})
    import json

    recorded = json.loads((out / "experiment.json").read_text())
    assert recorded["source_data_dir"] == str(source) and recorded["seeds"] == 1  # the CLI option won


def test_run_config_errors_are_one_line(tmp_path, capfd):
    bad = tmp_path / "bad.toml"
    bad.write_text("bogus_field = 3\n")
    for argv, needle in ((["run", "--config", str(tmp_path / "none.toml")], "none.toml"),
                         (["run", "--config", str(bad), "--out", str(tmp_path / "o")], "bogus_field")):
        capfd.readouterr()
        with pytest.raises(SystemExit) as exc:
            know_cli.main(argv)
        err = capfd.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and needle in err[0], err


def test_a_target_batch_larger_than_its_smallest_subset_is_refused_before_any_stage(tmp_path, capfd):
    source = _image_folder(tmp_path / "src", ["a", "b"], 20, 0)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        know_cli.main(["run", "--preset", "quick", "--out", str(tmp_path / "o"), "--source-dataset", "image-folder",
                       "--source-data-dir", str(source), "--source-classes", "", "--traj-batch-size", "8"])
    err = capfd.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--traj-batch-size" in err[0], err
    assert not (tmp_path / "o").exists()


def test_paper_preset_without_data_says_what_it_needs(tmp_path, capfd):
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        know_cli.main(["run", "--preset", "paper", "--out", str(tmp_path / "o")])
    err = capfd.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert "cifar-100-python" in err[0] and "--data-dir" in err[0]
    assert not (tmp_path / "o").exists()


def test_paper_preset_on_a_cpu_is_refused_with_an_estimate(tmp_path, capfd):
    _cifar(tmp_path / "data", 100, 10, 10, 0)
    _cifar(tmp_path / "data", 10, 10, 10, 1)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        know_cli.main(["run", "--preset", "paper", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                       "--device", "cpu"])
    err = capfd.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "hours" in err[0] and "--force-cpu" in err[0], err


@pytest.mark.slow
def test_paper_preset_at_smoke_scale(tmp_path, capfd):
    data = tmp_path / "data"
    _cifar(data, 100, 400, 100, 0)
    _cifar(data, 10, 200, 100, 1)
    out = tmp_path / "paper"
    smoke = ["--source-limit", "200", "--meta-limit", "200", "--meta-runs", "2", "--meta-epochs", "1",
             "--meta-pairs-per-run", "1000", "--width", "4", "--pretrain-epochs", "1", "--pretrain-batch-size", "50",
             "--traj-batch-size", "2", "--target-train-size", "100", "--phase1-epochs", "1", "--phase2-epochs", "1",
             "--seeds", "1", "--methods", "naive,know:2", "--ft-batch-size", "50"]
    with pytest.raises(SystemExit) as exc:
        know_cli.main(["run", "--preset", "paper", "--data-dir", str(data), "--out", str(out), "--device", "cpu",
                       *smoke])
    assert exc.value.code == 0, capfd.readouterr().err[-3000:]
    _finished(out, {"naive", "know", "shrink"})
    md = (out / "summary.md").read_text()
    assert "cifar100" in md and "cifar10" in md and "resnet18" in md
