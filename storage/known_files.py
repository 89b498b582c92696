"""KNOWN model files: a directory with one `known.pt` (state dicts + scaling + provenance),
meta-training checkpoints that resume, and the validation table.

    known_dir/known.pt            torch.save of know_core.known.save_known_set(...)
    known_dir/ckpt-<name>.pt      resumable meta-training state per model being trained
    known_dir/val_l1.csv          the validation-L1 comparison table
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import torch

from know_core.errors import MissingData
from know_core.data import UnsafeFileError  # noqa: F401 -- re-exported: what the loaders raise

KNOWN_FILE = "known.pt"


def safe_torch_load(path: str | os.PathLike, what: str) -> dict:
    """torch.load(weights_only=True): tensors, dicts, lists, tuples, str and numbers only.

    A file that holds anything else (a pickled callable would run code under plain
    torch.load), or that is corrupt, raises UnsafeFileError: one line naming the file and
    `what` it should have been. Errors opening the file (OSError) pass through as they are.
    """
    try:
        return torch.load(path, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise UnsafeFileError(f"{path}: refusing to load '{found.group(1)}' ({what} holds only tensors, "
                                  f"dicts, lists, strings and numbers); the file is not {what}") from None
        raise UnsafeFileError(f"{path}: not {what} (it is not a torch.save file of tensors and plain values)") from None
    except Exception as e:  # noqa: BLE001 -- truncated zip (RuntimeError), empty file (EOFError), ...
        reason = (str(e).splitlines() or [""])[0].split(". ")[0] or type(e).__name__
        raise UnsafeFileError(f"{path}: not {what}, the file is corrupt ({reason})") from None


def known_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / KNOWN_FILE


def save_known(directory: str | os.PathLike, payload: dict) -> Path:
    path = known_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a half-written file is never taken as a model
    return path


def load_known_payload(directory: str | os.PathLike) -> dict:
    path = known_path(directory)
    if not path.exists():
        raise MissingData(f"no trained KNOWN in {directory} (missing {KNOWN_FILE}); run `know meta-train --out {directory}` first")
    return safe_torch_load(path, f"a KNOWN model file ({KNOWN_FILE})")


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file: KNOWN sources enter cache keys by content, not by name."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def save_state(path: str | os.PathLike, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> dict | None:
    """A state saved by save_state (tensors and plain values), None if there is none.

    Read with weights_only=True: a file holding anything else raises UnsafeFileError."""
    path = Path(path)
    return safe_torch_load(path, "a meta-training checkpoint") if path.exists() else None
