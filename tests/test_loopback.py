"""Loopback by default: every long-running command of docs/operations.md (the Prefect server,
the Dask scheduler and the Dask workers, with their dashboards) listens on 127.0.0.1 / ::1 only.

The commands are read from the doc's bash blocks, so the doc is what is tested; only the port
numbers are swapped for free ones. The local Dask cluster that `know collect --runner dask`
starts by itself (flows.common.make_runner) is checked the same way. The listening sockets of
each process tree are read with psutil (the kernel's /proc/net/tcp{,6} and udp tables).
"""
from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest

from test_server import BIN, ROOT, Procs, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

DOC = ROOT / "docs" / "operations.md"
LOOPBACK = ("127.", "::1")


def documented_commands() -> list[str]:
    """The server, Dask scheduler and Dask worker command lines of the doc's bash blocks."""
    text = DOC.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if re.search(r"(^|\s)(prefect server start|dask scheduler|dask worker)\s", line + " "):
                lines.append(" ".join(line.split()))
    return lines


def listening(pid: int) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket, and every unconnected (receiving) UDP
    socket, of a process tree."""
    import socket

    import psutil

    root = psutil.Process(pid)
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr and not c.raddr):
                found.append((p.pid, c.laddr.ip, c.laddr.port))
    return found


def test_documented_commands_listen_on_loopback_only(tmp_path):
    commands = documented_commands()
    kinds = [next(k for k in ("prefect server start", "dask scheduler", "dask worker") if k in c) for c in commands]
    assert kinds.count("prefect server start") >= 1 and kinds.count("dask scheduler") == 1, commands
    assert kinds.count("dask worker") >= 2, commands
    server_cmds = [c for c, k in zip(commands, kinds) if k == "prefect server start"]
    assert len(set(server_cmds[1:]) - {server_cmds[0]}) <= 1  # plain and basic-auth variants
    ports = {"8786": str(free_port()), "8787": str(free_port()), "4200": str(free_port())}

    procs = Procs(tmp_path)
    started = []
    try:
        for i, (cmd, kind) in enumerate(zip(commands, kinds)):
            if kind == "prefect server start" and cmd != server_cmds[0]:
                continue  # one server is enough: the auth variant has the same --host
            for old, new in ports.items():
                cmd = re.sub(rf"(?<=[:\s]){old}\b", new, cmd)
            words = shlex.split(cmd)
            env_pairs = {}
            while "=" in words[0] and not words[0].startswith("-"):
                key, _, value = words.pop(0).partition("=")
                env_pairs[key] = value
            words[0] = str(BIN / words[0])
            p = procs.start(f"{i}-{kind.replace(' ', '-')}", words, procs.env(**env_pairs))
            started.append((kind, cmd, p))
            if kind == "dask scheduler":
                time.sleep(1)  # workers retry anyway; this just keeps their logs short

        # ready: the server answers, every Dask worker has registered with the scheduler
        import httpx

        n_workers = sum(int(m.group(1)) if (m := re.search(r"--nworkers (\d+)", c)) else 1
                        for k, c, _ in started if k == "dask worker")
        deadline = time.time() + 240
        while True:
            for kind, cmd, p in started:
                assert p.poll() is None, f"{cmd} exited {p.returncode}:\n{procs.log(p)[-3000:]}"
            registered = sum(procs.log(p).count("Registered to:") for k, _, p in started if k == "dask worker")
            try:
                healthy = httpx.get(f"http://127.0.0.1:{ports['4200']}/api/health", timeout=20).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy and registered >= n_workers:
                break
            assert time.time() < deadline, f"not ready: server healthy={healthy}, {registered}/{n_workers} workers"
            time.sleep(1)

        for kind, cmd, p in started:
            socks = listening(p.pid)
            assert socks, f"{cmd}: no listening socket found (is the check blind?)"
            outside = [s for s in socks if not s[1].startswith(LOOPBACK)]
            assert not outside, f"{cmd} listens beyond loopback: {outside}"
            if kind == "dask worker":  # worker and nanny, in two processes per worker
                assert len({pid for pid, _, _ in socks}) >= 2, socks
    finally:
        procs.stop_all()
    assert not procs.strays()


def test_know_local_dask_cluster_listens_on_loopback_only():
    """The cluster `know collect --runner dask` starts itself (no --dask-address)."""
    import os

    from distributed import LocalCluster

    from flows.common import make_runner

    runner = make_runner("dask", workers=2)
    with LocalCluster(**runner.cluster_kwargs) as cluster:
        deadline = time.time() + 120
        while len(cluster.scheduler.workers) < 2:
            assert time.time() < deadline, "local cluster workers did not come up"
            time.sleep(0.5)
        socks = listening(os.getpid())
        assert len({pid for pid, _, _ in socks}) >= 3, socks  # this process (scheduler) and two workers
        outside = [s for s in socks if not s[1].startswith(LOOPBACK)]
        assert not outside, f"the local Dask cluster listens beyond loopback: {outside}"
