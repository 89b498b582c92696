"""Goal 5: orchestration overhead of `know run --preset quick` under Prefect.

    .venv/bin/python benchmarks/bench_orchestration.py [--reps 2] [--preset quick]

A: `know run --preset quick --out <fresh dir>` against a `prefect server start` on 127.0.0.1
   (free port, temporary PREFECT_HOME for the server and a fresh one per client run, so no
   result or cache is shared between runs; analytics off).
B: the same CLI command in a plain Python process with benchmarks/_direct.py installed: every
   flow and task runs as its `.fn`, maps run in a thread pool of the flow's task-runner size.
   Same code, same parameters, fresh out dir; no Prefect API, states or result persistence.
R: after the loop, each A folder is run again (finished work: the CLI decides from its
   done.json that nothing is left, cli/fastpath.py), against the server and without it.
C: A with every flow-run heartbeat off (the CLI called inside prefect's temporary_settings with
   PREFECT_FLOWS_HEARTBEAT_FREQUENCY = None); the product itself turns off only its sub-flows'
   (flows/common.py: no_subflow_heartbeats), so C differs from A by the top-level run's.
   Why: Prefect 3.8.8's sync flow engine starts a heartbeat thread per flow run that sleeps in
   1 s steps, and joins it when the run ends (flow_engine._send_heartbeats): up to 1 s per flow
   run with heartbeats on (`know run --preset quick` made 14 flow runs on 2026-12-02).
Runs alternate A B C C B A ...; the medians give the ratios. The script also counts the Prefect
runs' task and flow runs (from the server). The server is stopped (its process group) at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import ROOT, footer, header, median, ratio_line

VENV_BIN = Path(sys.executable).parent
GOAL = 1.10
RERUN_GOAL = 0.15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def start_server(home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 180:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited ({proc.returncode}); see {log}")
        try:
            api(url, "/health")
            print(f"# prefect server on {url} (pid {proc.pid}) up in {time.perf_counter() - t0:.1f} s", flush=True)
            return proc, url
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError("prefect server did not answer /health in 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_cli(work: Path, tag: str, preset: str, api_url: str | None, child: str = "", out_tag: str = "") -> float:
    """`know run` under Prefect (api_url), or in a child of this script (child: direct | no-heartbeat);
    out_tag: the output folder of an earlier run (a re-run of finished work)."""
    out = work / f"out-{out_tag or tag}"
    home = work / f"home-{tag}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if child:
        cmd = [sys.executable, __file__, "--child", child, "--preset", preset, "--out", str(out)]
    else:
        cmd = [str(VENV_BIN / "know"), "run", "--preset", preset, "--out", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / f"log-{tag}.txt").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{tag} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    if not (out / "summary.md").exists():
        raise RuntimeError(f"{tag}: no summary.md in {out}")
    if not api_url and "Starting temporary server" in res.stdout + res.stderr:
        print(f"# WARNING: {tag} started a temporary Prefect server: the baseline is not Prefect-free")
    print(f"  {tag:12s} {wall:7.1f} s", flush=True)
    return wall


def child(args) -> None:
    argv = ["run", "--preset", args.preset, "--out", args.out]
    if args.child == "direct":
        sys.path.insert(0, str(Path(__file__).parent))
        import _direct

        _direct.install()
        import know_cli

        know_cli.main(argv)
        return
    import know_cli  # sets the CLI's Prefect defaults before prefect is imported
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        know_cli.main(argv)


def prefect_breakdown(url: str) -> dict:
    """Task and flow run counts, from the server."""
    return {"task_runs": api(url, "/task_runs/count", {}), "flow_runs": api(url, "/flow_runs/count", {})}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2, help="runs of each variant (alternated A B C C B A ...)")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--out")
    ap.add_argument("--child", choices=("direct", "no-heartbeat"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    header(f"Orchestration overhead: know run --preset {args.preset} (goal 5)")
    work = Path(tempfile.mkdtemp(prefix="know-bench-orch-"))
    proc = None
    sides = {"prefect": (True, ""), "direct": (False, "direct"), "no-heartbeat": (True, "no-heartbeat")}
    walls = {side: [] for side in sides}
    try:
        proc, url = start_server(work / "server-home", work / "server.log")
        order = []
        for r in range(args.reps):
            order += list(sides) if r % 2 == 0 else list(sides)[::-1]
        for i, side in enumerate(order):
            use_api, child_mode = sides[side]
            walls[side].append(run_cli(work, f"{side}-{i}", args.preset, url if use_api else None, child_mode))
        info = prefect_breakdown(url)
        firsts = [(i, side) for i, side in enumerate(order) if side == "prefect"]
        reruns = [run_cli(work, f"rerun-{i}", args.preset, url, out_tag=f"{side}-{i}") for i, side in firsts]
        reruns_own = [run_cli(work, f"rerun-own-{i}", args.preset, None, out_tag=f"{side}-{i}") for i, side in firsts]
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(work, ignore_errors=True)
    a, b, c = (median(walls[s]) for s in ("prefect", "direct", "no-heartbeat"))
    n_prefect = 2 * args.reps  # A and C both record runs on the server
    tasks, flows = info["task_runs"] / n_prefect, info["flow_runs"] / n_prefect
    print(f"# per experiment: {tasks:.0f} task runs, {flows:.0f} flow runs; walls (s): "
          + "; ".join(f"{s} " + ", ".join(f"{w:.1f}" for w in ws) for s, ws in walls.items()))
    ratio_line("prefect_vs_direct_wall", a / b, GOAL,
               f"prefect {a:.1f} s vs direct {b:.1f} s: +{a - b:.1f} s, {(a - b) / flows:.2f} s per flow run",
               higher_is_better=False)
    ratio_line("rerun_finished_vs_first_wall", median(reruns) / a, RERUN_GOAL,
               f"re-run of a finished folder {median(reruns):.1f} s vs first run {a:.1f} s (against the server); "
               f"without PREFECT_API_URL {median(reruns_own):.1f} s", higher_is_better=False)
    ratio_line("prefect_no_heartbeat_vs_direct_wall", c / b, GOAL,
               f"every heartbeat off {c:.1f} s (the product already turns sub-flows' off, flows/common.py: "
               f"no_subflow_heartbeats; this also drops the top-level run's): {a - c:+.1f} s vs A",
               higher_is_better=False)
    footer()


if __name__ == "__main__":
    main()
