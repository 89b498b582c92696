"""The record a finished `know run` or `know study` leaves in its output folder (`done.json`),
so that running the same command again can tell, before any engine starts, that nothing is
left to do.

The record holds the command's identity (its settings, without runtime fields), the
completion stamp of every store run it used, and the sha256 of every product file. It is
current only when all of them still match: changed settings, a re-collected or deleted run,
or an edited or missing product make it stale, and the command then runs as usual (its
stages still skip what the store shows as up to date).

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> (out / "summary.md").write_text("table")
    5
    >>> write_done(out, {"preset": "quick"}, files=["summary.md"])
    >>> is_done(out, {"preset": "quick"}), is_done(out, {"preset": "standard"})
    (True, False)
    >>> (out / "summary.md").write_text("edited")
    6
    >>> is_done(out, {"preset": "quick"})
    False
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .known_files import file_digest
from .results import save_text

DONE = "done.json"


def _runs(store: str, run_ids: list[str]) -> dict[str, str]:
    if not run_ids:
        return {}
    from .trajectory import TrajectoryStore

    st = TrajectoryStore(store)
    stamps = {}
    for rid in run_ids:
        attrs = st.run_attrs(rid) or {}
        stamps[rid] = str(attrs.get("completed_at", "")) if attrs.get("status") == "complete" else ""
    return stamps


def _record(out: Path, identity: dict[str, Any], store: str, run_ids: list[str], files: list[str]) -> dict[str, Any]:
    return {"identity": json.loads(json.dumps(identity, sort_keys=True, default=str)), "store": store,
            "runs": _runs(store, sorted(set(run_ids))),
            "files": {f: file_digest(out / f) if (out / f).is_file() else "" for f in files}}


def write_done(out: str | os.PathLike, identity: dict[str, Any], store: str = "", run_ids: list[str] = (),
               files: list[str] = ()) -> None:
    """Record that the command with `identity` finished, with the runs and product files it made."""
    out = Path(out)
    save_text(json.dumps(_record(out, identity, store, list(run_ids), list(files)), indent=1, sort_keys=True),
              out / DONE)


def is_done(out: str | os.PathLike, identity: dict[str, Any]) -> bool:
    """Whether `out` holds a finished command with this identity whose runs and files are as it left them."""
    out = Path(out)
    try:
        have = json.loads((out / DONE).read_text())
        now = _record(out, identity, have.get("store", ""), list(have.get("runs", {})), list(have.get("files", {})))
    except Exception:  # noqa: BLE001 - unreadable record, store or file: not done, run as usual
        return False
    return have == now and all(now["files"].values()) and all(now["runs"].values())


def clear_done(out: str | os.PathLike) -> None:
    """Drop the record (a command starts work in the folder)."""
    (Path(out) / DONE).unlink(missing_ok=True)


__all__ = ["DONE", "write_done", "is_done", "clear_done"]
