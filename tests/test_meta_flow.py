"""Meta-training flow end to end: real Prefect (test harness), real Zarr store, digits.

The output directory is the cache: a finished model directory (known.pt whose input hash
matches) is not retrained; an interrupted one resumes from its per-epoch checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import zarr

# imported at collection, not inside a test: importing prefect configures its log handlers on the
# stderr of that moment, which must not be a capture fixture's file (closed after its test)
import flows.predict  # noqa: F401
import know_cli
from conftest import REFERENCE_DIR

# slow: the tests share the module-scoped `world` (a meta sweep and a target run) and `trained`
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

OLD_NS = 1_000_000_000_000_000_000  # 2001-09-09: any rewrite of a file moves its mtime off this
EPOCHS, PAIRS = 2, 2000


@pytest.fixture(scope="module")
def world(tmp_path_factory, prefect_harness):
    """Three simple-cnn and three mlp meta runs (7 stages) plus a resnet target run."""
    from conftest import collect_small_world

    root = tmp_path_factory.mktemp("meta")
    store = root / "runs.zarr"
    meta_ids, target = collect_small_world(store)
    return SimpleNamespace(root=root, store=store, meta_ids=meta_ids, target=target)


def _params(world, out: Path, **kw):
    from flows.meta_train import MetaTrainParams

    base = dict(store=str(world.store), out=str(out), epochs=EPOCHS, pairs_per_run=PAIRS,
                official_dir=str(REFERENCE_DIR), exclude_runs=world.target)
    return MetaTrainParams(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(world, reference_dir):  # _params: official_dir=REFERENCE_DIR
    from flows.meta_train import meta_train_known

    out = world.root / "known"
    result = meta_train_known(_params(world, out))
    return SimpleNamespace(out=out, result=result)


@pytest.mark.needs_reference
def test_meta_train_writes_models_and_tables(world, trained):
    from know_core.known import known_set_from_dict
    from storage.known_files import load_known_payload

    out = trained.out
    assert (out / "known.pt").is_file()
    assert (out / "all" / "raw" / "known.pt").is_file() and (out / "all" / "minmax" / "known.pt").is_file()
    assert not list(out.rglob("ckpt-*.pt")), "finished training must not leave checkpoints behind"

    table = pd.read_csv(out / "val_l1.csv")
    assert list(table.columns) == ["val_runs_of", "method", "kind", "val_l1", "n_pairs"]
    assert set(table.val_runs_of) == {"all"}  # one mode only (the target's sequential run is excluded)
    methods = {"known-raw[all]", "known-minmax[all]", "official", "taskvector", "logfit", "identity", "constant-scale"}
    assert set(table.method) == methods
    for m in methods:
        rows = table[table.method == m]
        assert sorted(rows.kind) == ["all", "bias", "conv", "fc"], m
        assert (rows.val_l1 > 0).all() and rows.val_l1.notna().all(), m
    # 'all' is the pair-weighted mean of the kinds
    for m in methods:
        rows = table[table.method == m].set_index("kind")
        kinds = rows.drop("all")
        assert rows.loc["all", "n_pairs"] == kinds.n_pairs.sum()
        assert rows.loc["all", "val_l1"] == pytest.approx((kinds.val_l1 * kinds.n_pairs).sum() / kinds.n_pairs.sum())
    # the default is the better of the two scalings, and its numbers are in the table
    scaling = trained.result["scaling"]
    alls = table[table.kind == "all"].set_index("method").val_l1
    assert alls[f"known-{scaling}[all]"] == min(alls["known-raw[all]"], alls["known-minmax[all]"])
    assert len(trained.result["table"]) == len(table)

    runs = pd.read_csv(out / "runs.csv")
    assert {"run_id", "mode", "coherence", "coherence_conv", "coherence_fc", "coherence_bias", "meta_data"} <= set(runs.columns)
    assert runs.coherence.between(-1, 1).all()
    assert {"l1_official", "l1_identity", f"l1_known-{scaling}[all]"} <= set(runs.columns)

    default = load_known_payload(out)
    assert default["scaling"] == scaling
    assert (out / "known.pt").read_bytes() == (out / "all" / scaling / "known.pt").read_bytes()
    prov = default["provenance"]
    train, val = prov["train_runs"], prov["val_runs"]
    assert set(runs.run_id) == set(val)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(world.meta_ids)  # the excluded target run is in neither
    store = zarr.open_group(str(world.store), mode="r")
    model_of = {rid: store[f"runs/{rid}"].attrs["model"] for rid in world.meta_ids}
    for side in (train, val):
        assert {model_of[r] for r in side} == {"simple-cnn", "mlp"}, side
    ks = known_set_from_dict(default)  # loads as a KnownSet that predicts
    window = 0.01 * torch.randn(64, 5).cumsum(1)
    for kind in ("conv", "fc", "bias"):
        r = ks.residual(kind, window)
        assert r.shape == (64,) and torch.isfinite(r).all()
    history = json.loads(prov["history"])
    assert sorted(history) == ["bias", "conv", "fc"]
    assert all(1 <= len(rows) <= EPOCHS for rows in history.values())


@pytest.mark.needs_reference
def test_rerun_is_skipped(world, trained):
    from flows.meta_train import meta_train_known

    out = trained.out
    models = [out / "known.pt", out / "all" / "raw" / "known.pt", out / "all" / "minmax" / "known.pt"]
    for f in models:
        os.utime(f, ns=(OLD_NS, OLD_NS))
    before = pd.read_csv(out / "val_l1.csv")

    result = meta_train_known(_params(world, out))

    for f in models:
        assert os.stat(f).st_mtime_ns == OLD_NS, f"{f} was rewritten"
    assert result["scaling"] == trained.result["scaling"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "val_l1.csv"), before)
    # the flow's body as a plain function, outside any run (its lock once asked Prefect for a
    # run logger and raised MissingContextError): the same answer, nothing rewritten
    assert meta_train_known.fn(_params(world, out))["scaling"] == trained.result["scaling"]
    assert all(os.stat(f).st_mtime_ns == OLD_NS for f in models)


@pytest.mark.needs_reference
def test_changed_config_retrains(world, trained, tmp_path):
    """The cache key holds the config: other pairs per run -> a new model, not the cached one."""
    from flows.meta_train import meta_train_known
    from storage.known_files import load_known_payload

    out = tmp_path / "known"
    shutil.copytree(trained.out, out)
    old = load_known_payload(out / "all" / "raw")["provenance"]["input_hash"]
    meta_train_known(_params(world, out, pairs_per_run=PAIRS // 2, compare_modes=False))
    new = load_known_payload(out / "all" / "raw")["provenance"]
    assert new["input_hash"] != old and new["config"]["pairs_per_run"] == PAIRS // 2


@pytest.mark.needs_reference
def test_interrupted_training_resumes_from_its_checkpoint(world, tmp_path):
    """Killed after KNOWN conv finished and before fc saved an epoch: the rerun resumes conv.

    Resuming under a different epoch budget is not possible by design (the input hash that
    keys every checkpoint includes `epochs`, and a finished model deletes its checkpoints),
    so the interruption is a real failure: the fc checkpoint's temporary file can't be written.
    """
    from storage.known_files import load_known_payload, load_state
    from tasks.meta import MetaTrainParams, train_known_set

    spec = MetaTrainParams(**_params(world, tmp_path / "known").model_dump())
    out = tmp_path / "known" / "all" / "raw"
    out.mkdir(parents=True)
    blocker = out / "ckpt-fc.tmp"  # save_state writes here, then renames: a directory makes it fail
    blocker.mkdir()
    with pytest.raises((OSError, RuntimeError), match="Is a directory"):
        train_known_set.fn(spec, "all", "raw")
    assert not (out / "known.pt").exists()
    assert not (out / "ckpt-fc.pt").exists()
    conv = load_state(out / "ckpt-conv.pt")
    assert conv["epoch"] == EPOCHS and len(conv["history"]) == EPOCHS
    shutil.rmtree(blocker)

    assert train_known_set.fn(spec, "all", "raw") == str(out)

    payload = load_known_payload(out)
    history = json.loads(payload["provenance"]["history"])
    assert history["conv"] == conv["history"]  # same rows, same wall times: conv was not retrained
    for name, value in conv["best_model"].items():
        assert torch.equal(payload["models"]["conv"][name], value), name
    assert [r["epoch"] for r in history["fc"]] == list(range(1, EPOCHS + 1))
    assert [r["epoch"] for r in history["bias"]] == list(range(1, EPOCHS + 1))
    assert not list(out.glob("ckpt-*")), "checkpoints must be gone once the model is saved"

    # a checkpoint from another configuration is not resumed: training starts over
    other = spec.model_copy(update={"lr": 2e-3})
    torch.save(conv, out / "ckpt-conv.pt")  # still keyed by the first config's input hash
    train_known_set.fn(other, "all", "raw")
    redone = json.loads(load_known_payload(out)["provenance"]["history"])["conv"]
    assert [r["epoch"] for r in redone] == list(range(1, EPOCHS + 1))
    assert [r["wall_s"] for r in redone] != [r["wall_s"] for r in conv["history"]]


@pytest.mark.needs_reference
def test_too_few_runs_is_bad_input(world, tmp_path):
    from flows.meta_train import meta_train_known
    from tasks.common import BadInput

    store = tmp_path / "one.zarr"
    shutil.copytree(world.store, store)
    root = zarr.open_group(str(store), mode="a")
    for rid in world.meta_ids[1:]:
        del root[f"runs/{rid}"]
    out = tmp_path / "known"
    with pytest.raises(BadInput) as err:
        meta_train_known(_params(world, out).model_copy(update={"store": str(store)}))
    msg = str(err.value)
    assert "\n" not in msg
    assert "at least 2 complete runs" in msg and "found 1" in msg
    assert not (out / "known.pt").exists()


def _cli_one_line_error(argv, capfd) -> str:
    """`know ...` exits 2 with exactly one line on stderr (fd level, so Prefect's logs count too)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        know_cli.main([str(a) for a in argv])
    _, err = capfd.readouterr()
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cli_meta_train_on_missing_store(tmp_path, capfd):
    missing = tmp_path / "none.zarr"
    line = _cli_one_line_error(["meta-train", "--store", missing, "--out", tmp_path / "known"], capfd)
    assert "does not exist" in line and str(missing) in line
    assert not missing.exists() and not (tmp_path / "known").exists()


def _flow_runs() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.count_flow_runs()


def test_cli_meta_train_too_few_runs(world, tmp_path, capfd):
    before = _flow_runs()
    line = _cli_one_line_error(["meta-train", "--store", world.store, "--out", tmp_path / "known",
                                "--exclude-runs", ",".join([*world.meta_ids[1:], world.target])], capfd)
    assert "at least 2 complete runs" in line and "found 1" in line
    assert not (tmp_path / "known").exists()
    # refused before any flow starts (a failed flow would also log its traceback to stderr)
    assert _flow_runs() == before
