"""The import stage: the authors' released meta-data files as complete runs of a store.

    from flows.release import ImportParams, import_release
    import_release(ImportParams(files=["simplenet_cifar10_r0.5_lr0.001_bs64.mat"], store="runs.zarr"))

Every file is checked (name, datasets, shapes, sizes) before any is written, so one bad file
imports none; files then import one after another (the work is reading and writing bytes).
"""
from __future__ import annotations

from prefect import flow

from know_core.errors import BadInput
from params.release import ImportParams
from storage.release_import import ReleaseFile, inspect_release
from storage.trajectory import TrajectoryStore
from tasks.release import import_file

from .common import resume_hint


def preflight(params: ImportParams) -> list[ReleaseFile]:
    """Every file inspected (no values read); BadInput/MissingData for the first bad one."""
    if len(set(params.files)) != len(params.files):
        dup = next(f for f in params.files if params.files.count(f) > 1)
        raise BadInput(f"{dup} is given twice; name each file once")
    return [inspect_release(f, params.stages, params.overrides(), params.n_data) for f in params.files]


@flow(name="import-release", log_prints=True)
def import_release(params: ImportParams) -> list[dict]:
    """Import release .mat files as independent-mode runs; returns one {file, run_id, status} per file."""
    with resume_hint("import-release"):
        preflight(params)
        TrajectoryStore(params.store).prepare()
        print(f"importing {len(params.files)} release files into {params.store}")
        return [import_file(params, path) for path in params.files]


__all__ = ["ImportParams", "import_release", "preflight"]
