"""Shared test setup.

Prefect settings are read when prefect is first imported, so they are set here, at module
import (pytest imports conftest.py before any test module). Every test session gets its
own PREFECT_HOME, so tests never touch the project's `.prefect/` or a user's profile.

Fixtures:
    prefect_harness   session-scoped temporary Prefect server + SQLite db; request it only
                      in tests that run flows, so pure tests stay fast
    digits_train      the scikit-learn digits training split (module-cached, read-only use)
    make_store        factory for a fresh TrajectoryStore under tmp_path
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="know-tests-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["PREFECT_HOME"] = _PREFECT_HOME  # always a per-session directory
os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

#: the authors' released KNOWN files and reference outputs (see its README)
REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "know_reference"

# Small models on a 2-core machine: one thread is much faster than two.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API server for the whole session (starts in a few seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def digits_train():
    """scikit-learn digits, the seeded 75 % training split (1,348 images, 1x8x8). Do not mutate."""
    from know_core.data import load_dataset

    return load_dataset("digits", "train")


@pytest.fixture
def make_store(tmp_path):
    """`make_store(name="store.zarr", **kwargs)` -> a new TrajectoryStore in tmp_path."""
    from storage.trajectory import TrajectoryStore

    def make(name: str = "store.zarr", **kwargs) -> TrajectoryStore:
        return TrajectoryStore(tmp_path / name, **kwargs)

    return make


def collect_small_world(store) -> tuple[list[str], str]:
    """Three simple-cnn and three mlp meta runs (7 stages, digits) plus a 7-stage resnet
    target run, collected into `store`; returns (meta run ids, target run id)."""
    from flows.collect import CollectParams, TrajectoryParams, collect_trajectories, forgetting_trajectory

    meta_ids = collect_trajectories(CollectParams(store=str(store), dataset="digits", models="simple-cnn,mlp", runs=3,
                                                  stages=7, limit=600, workers=2))
    target = forgetting_trajectory(TrajectoryParams(store=str(store), dataset="digits", classes="0-4", model="resnet",
                                                    width=8, stages=7, pretrain_epochs=1, batch_size=8,
                                                    pretrain_batch_size=32))
    return meta_ids, target
