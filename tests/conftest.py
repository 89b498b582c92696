"""Shared test setup.

Prefect settings are read when prefect is first imported, so they are set here, at module
import (pytest imports conftest.py before any test module). Every test session gets its
own PREFECT_HOME, so tests never touch the project's `.prefect/` or a user's profile.

Fixtures:
    prefect_harness   session-scoped temporary Prefect server + SQLite db; request it only
                      in tests that run flows, so pure tests stay fast
    digits_train      the scikit-learn digits training split (module-cached, read-only use)
    make_store        factory for a fresh TrajectoryStore under tmp_path
    reference_dir     REFERENCE_DIR, or a skip when the authors' files are not beside this checkout

Markers (registered here):
    needs_reference   the test reads REFERENCE_DIR (directly, through a fixture, or as a flow's
                      `official_dir`); skipped, not errored, when those files are absent
    slow              declared in pyproject.toml; `pytest -m "not slow"` is the fast lane
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
os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")  # as the CLI: nothing persisted, nothing read back
os.environ.setdefault("PREFECT_TASKS_DISABLE_CACHING", "true")
os.environ.setdefault("PREFECT_RESULTS_DEFAULT_SERIALIZER", "json")  # as the CLI: results are never pickles

import prefect.main  # noqa: E402,F401 - sets up Prefect's logging now, on the real stderr; set up first
import pytest  # noqa: E402  # inside a capsys test, its console handler would keep a stream closed after it
import torch  # noqa: E402

#: the authors' released KNOWN files and reference outputs (see its README); not part of the
#: project, so a plain clone has no ../shared: tests that need it carry `needs_reference`
REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "know_reference"
REFERENCE_FILES = ("KNOWN_Conv.h5", "KNOWN_FC.h5", "KNOWN_Bias.h5", "known_reference_outputs.npz")
NO_REFERENCE = ("needs the authors' KNOWN h5 files in ../shared/know_reference, absent in this checkout "
                f"(looked for {', '.join(REFERENCE_FILES)} in {REFERENCE_DIR})")


def reference_available() -> bool:
    """True when every file of REFERENCE_DIR that the tests read is there."""
    return all((REFERENCE_DIR / name).is_file() for name in REFERENCE_FILES)


# Small models on a 2-core machine: one thread is much faster than two.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skip `needs_reference` tests, before any of their fixtures run, when REFERENCE_DIR is incomplete."""
    if reference_available():
        return
    skip = pytest.mark.skip(reason=NO_REFERENCE)
    for item in items:
        if item.get_closest_marker("needs_reference") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """REFERENCE_DIR; skips the requesting test when the authors' files are not there."""
    if not reference_available():
        pytest.skip(NO_REFERENCE)
    return REFERENCE_DIR


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
    from flows.collect import CollectParams, collect_trajectories
    from flows.trajectory import TrajectoryParams, forgetting_trajectory

    meta_ids = collect_trajectories(CollectParams(store=str(store), dataset="digits", models="simple-cnn,mlp", runs=3,
                                                  stages=7, limit=600, workers=2))
    target = forgetting_trajectory(TrajectoryParams(store=str(store), dataset="digits", classes="0-4", model="resnet",
                                                    width=8, stages=7, pretrain_epochs=1, batch_size=8,
                                                    pretrain_batch_size=32))
    return meta_ids, target
