"""Result files of a run: tables (CSV), text (markdown) and figures (PNG).

Every writer goes through a temporary file in the target's directory and ``os.replace``, so
an interrupted run never leaves a half-written file under the final name (the old file, if
any, stays until the new one is complete).  Parent directories are created.

    save_table(df, path)              CSV without the index
    load_table(path)                  the CSV back as a DataFrame
    save_text(text, path)             UTF-8 text
    save_figure(fig, path, dpi=120)   PNG (or the format the suffix names); closes the figure
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pandas as pd


def _atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        kwargs = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def save_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` as CSV (no index) atomically; returns the path."""
    return _atomic_write(path, lambda fh: df.to_csv(fh, index=False), "w")


def load_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`save_table`."""
    return pd.read_csv(path)


def save_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8) atomically; returns the path."""
    return _atomic_write(path, lambda fh: fh.write(text), "w")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (PNG unless the suffix names another format the
    backend knows, e.g. .pdf/.svg) and close it; returns the path."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        return _atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi), "wb")
    finally:
        # A figure can only be registered with pyplot if pyplot was imported; never import it
        # here (that would pick a GUI backend in some environments).
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:
            pyplot.close(fig)


__all__ = ["save_table", "load_table", "save_text", "save_figure"]
