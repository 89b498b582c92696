"""Shared helpers of the benchmark scripts: machine header, interleaved timing, ratio lines.

Every script prints a header (date, nproc, CPU model, load average), then one line per
figure of the form

    RATIO <name> = <ratio> (goal <op> <target>: PASS|MISS)   <absolute numbers>

and a footer with the load average at the end. The machines these run on are shared, so
every ratio is measured side by side in the same process: A and B are interleaved rep by rep
and the medians are compared.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py` from the repo root
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def header(title: str) -> None:
    print(f"# {title}")
    print(f"# date {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}  nproc {os.cpu_count()}  "
          f"cpu {cpu_model()!r}  python {platform.python_version()}")
    print(f"# load average at start: {loadavg()}", flush=True)


def footer() -> None:
    print(f"# load average at end: {loadavg()}", flush=True)


def median(values) -> float:
    return statistics.median(values)


def interleave(fns: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Call each fn once per rep, in a rotating order; each returns a measurement."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            out[name].append(fns[name]())
    return out


def ratio_line(name: str, ratio: float, goal: float | None, detail: str, higher_is_better: bool = True) -> str:
    """One result line; goal None = informational."""
    if goal is None:
        verdict = "info"
    else:
        ok = ratio >= goal if higher_is_better else ratio <= goal
        verdict = f"goal {'>=' if higher_is_better else '<='} {goal:g}: {'PASS' if ok else 'MISS'}"
    line = f"RATIO {name} = {ratio:.3f} ({verdict})   {detail}"
    print(line, flush=True)
    return line


def fmt_rate(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"
