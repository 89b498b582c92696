"""KNOWN model files: a directory with one `known.pt` (state dicts + scaling + provenance),
meta-training checkpoints that resume, and the validation table.

    known_dir/known.pt            torch.save of know_core.known.save_known_set(...)
    known_dir/ckpt-<name>.pt      resumable meta-training state per model being trained
    known_dir/val_l1.csv          the validation-L1 comparison table
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

KNOWN_FILE = "known.pt"


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
        raise FileNotFoundError(f"no trained KNOWN in {directory} (missing {KNOWN_FILE}); run `know meta-train --out {directory}` first")
    return torch.load(path, weights_only=True)


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
    path = Path(path)
    return torch.load(path, weights_only=False) if path.exists() else None
