"""Any checkpoint as Θ0: import a user's state_dict file into the store as a checkpoint.

`know trajectory --checkpoint FILE` starts the target trajectory from the weights in FILE
instead of pre-training. FILE is a state_dict: a `.safetensors` file (read with the
safetensors package) or anything else `torch.load(FILE, weights_only=True)` reads (a dict of
tensors, optionally under a "state_dict" key); no pickled code is ever run.

The checkpoint's id is `file-<sha256[:16]>` of the file's bytes and the RunSpec's `start` is
that id, so the file's content is part of the run id; the full sha256 is kept in the
checkpoint record (`sha256`) and in the run record (`checkpoint_sha256`). A file holds no
Adam moments: under the `carry` regime the trajectory starts with empty ones (the run records
`adam_start: empty`).

    from tasks.checkpoint import checkpoint_start
    start, sha = checkpoint_start("ck.pt")   # ('file-3f2a...', '3f2a...')
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from prefect import task

from know_core.errors import BadInput, MissingData, one_line
from know_core.layout import flatten_state, param_layout
from storage.records import CheckpointInfo
from storage.trajectory import TrajectoryStore

from .common import retry_unless_bad_input, run_logger
from .specs import RunSpec

PREFIX = "file-"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise MissingData(f"checkpoint {path}: no such file") from None
    return h.hexdigest()


def checkpoint_start(path: str | Path) -> tuple[str, str]:
    """(checkpoint id `file-<sha256[:16]>`, full sha256) of a state_dict file."""
    sha = file_sha256(path)
    return PREFIX + sha[:16], sha


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict file; a one-line BadInput for a file that is not one."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        if importlib.util.find_spec("safetensors") is None:
            raise BadInput(f"checkpoint {path}: reading .safetensors files needs the safetensors package: "
                           "pip install safetensors (or save the state_dict with torch.save)")
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file
            raise BadInput(f"checkpoint {path} is not a readable .safetensors file ({type(e).__name__}: "
                           f"{one_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MissingData(f"checkpoint {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError (code or objects in it), a truncated file, ...
        raise BadInput(f"checkpoint {path} cannot be read as a state_dict with torch.load(weights_only=True) "
                       f"({type(e).__name__}: {one_line(e)}); save model.state_dict() with torch.save") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise BadInput(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors); "
                       "save model.state_dict() with torch.save")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise BadInput(f"checkpoint {path}: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor; save "
                       "model.state_dict() with torch.save")
    return obj


def check_fits(state: dict[str, torch.Tensor], model: torch.nn.Module, path: str | Path, model_name: str,
               num_classes: int | None = None) -> None:
    """One-line BadInput naming the first key of the model's state_dict that the file lacks or
    holds with another shape (then the first key the model does not have)."""
    want = model.state_dict()
    for key, tensor in want.items():
        if key not in state:
            raise BadInput(f"checkpoint {path} does not fit model {model_name!r}: key {key!r} (shape "
                           f"{tuple(tensor.shape)}) is missing from the file")
        if tuple(state[key].shape) != tuple(tensor.shape):
            hint = ""
            head = getattr(model, "know_head", "")
            if num_classes is not None and head and key.startswith(head + "."):
                hint = f"; {head!r} is the head, which must output the data's {num_classes} classes"
            raise BadInput(f"checkpoint {path} does not fit model {model_name!r}: key {key!r} has shape "
                           f"{tuple(state[key].shape)} in the file, {tuple(tensor.shape)} in the model{hint}")
    extra = next((k for k in state if k not in want), None)
    if extra is not None:
        raise BadInput(f"checkpoint {path} does not fit model {model_name!r}: the file has key {extra!r} "
                       f"(shape {tuple(state[extra].shape)}), which the model does not")


def checked_state(path: str | Path, spec: RunSpec, data) -> tuple[dict[str, torch.Tensor], torch.nn.Module, dict]:
    """(the file's state_dict, the run's model holding it, the model spec as a dict); BadInput
    when the file is not a state_dict of that model."""
    mspec = spec.model_spec(data)
    model = spec.build_model(data)
    state = read_state_dict(path)
    check_fits(state, model, path, spec.model, data.num_classes)
    model.load_state_dict(state, strict=True)
    return state, model, mspec.to_dict()


def preflight_checkpoint(path: str | Path, spec: RunSpec, data) -> None:
    """What import_checkpoint checks, before any flow starts: the file is a state_dict that
    fits the run's model and is the file the run id was made from."""
    if spec.checkpoint_sha256 and file_sha256(path) != spec.checkpoint_sha256:
        raise BadInput(f"checkpoint {path} changed while the run was being planned; run the command again")
    checked_state(path, spec, data)


@task(name="import-checkpoint", retries=1, retry_delay_seconds=1, retry_condition_fn=retry_unless_bad_input,
      task_run_name="import-checkpoint-{spec.start}")
def import_checkpoint(store_url: str, path: str, spec: RunSpec) -> str:
    """Put the state_dict file `path` into the store as checkpoint `spec.start` (Θ0 of the run
    `spec`); skipped when the store already holds it complete with the same sha256."""
    log = run_logger()
    store = TrajectoryStore(store_url)
    ckpt = spec.start
    sha = file_sha256(path)
    if not ckpt.startswith(PREFIX) or ckpt != PREFIX + sha[:16] or (spec.checkpoint_sha256 and sha != spec.checkpoint_sha256):
        raise BadInput(f"checkpoint {path} (sha256 {sha[:16]}...) is not the file run {spec.run_id} was planned from "
                       f"(start {ckpt}); it changed meanwhile: run the command again")

    def imported() -> bool:
        rec = store.checkpoint(ckpt)
        return rec is not None and rec.is_complete and rec.sha256 == sha

    if imported():
        log.info("checkpoint %s (from %s) already in the store: skipped", ckpt, path)
        return ckpt
    lease = store.lease_checkpoint(ckpt, done=imported, log=log)  # waits while another process imports it
    if lease is None:
        log.info("checkpoint %s already imported (by another process): skipped", ckpt)
        return ckpt
    with lease:
        data = spec.load("train")
        state, model, mspec = checked_state(path, spec, data)
        layout = param_layout(model)
        store.save_checkpoint(ckpt, flatten_state(model.state_dict(), layout), layout, CheckpointInfo(
            spec={"file": str(path), "sha256": sha}, model_spec=mspec, sha256=sha, source_file=str(path),
        ))
    moments = "; no Adam moments in a file: the carry regime starts with empty ones" if spec.adam_start() == "empty" else ""
    log.info("checkpoint %s imported from %s (%d tensors)%s", ckpt, path, len(state), moments)
    return ckpt
