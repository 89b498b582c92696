"""How a command ends: a bug is a traceback and exit 1 (never a one-line "bad input" with
exit 2), and an unreachable Prefect API is one line that names PREFECT_API_URL."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import know_cli

ROOT = Path(know_cli.__file__).resolve().parent


def test_a_keyerror_inside_a_task_is_a_bug_exit_1_with_traceback(tmp_path, prefect_harness, monkeypatch, capfd):
    import tasks.collect

    def broken(*args, **kwargs):  # a bug planted in the code a task runs
        raise KeyError("planted-bug")

    monkeypatch.setattr(tasks.collect, "iter_trajectory", broken)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))  # where the full log goes
    store = tmp_path / "runs.zarr"
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        know_cli.main(["collect", "--store", str(store), "--runs", "1", "--stages", "3", "--limit", "200"])
    err = capfd.readouterr().err
    assert exc.value.code == 1
    assert "Traceback" in err and "KeyError" in err and "planted-bug" in err
    assert "is not a user error" in err and "know-errors.log" in err
    log = tmp_path / "home" / "know-errors.log"
    assert "planted-bug" in log.read_text()
    from storage.trajectory import TrajectoryStore

    assert not any(r.is_complete for r in TrajectoryStore(store).runs())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_api_is_one_line_naming_prefect_api_url(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, str(ROOT / "know_cli.py"), "submit", "collect", "--param", "runs=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "PREFECT_API_URL" in lines[0] and url in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
