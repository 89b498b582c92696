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


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Peak memory of this process: `peak_mb` is VmHWM, the high-water mark of its own address
    space (ru_maxrss is not: after the vfork+exec of subprocess it also holds the *parent's*
    peak); `anon_peak_mb` is the largest RssAnon seen by a sampler thread (every `every` s),
    i.e. without the file-backed pages of mapped libraries (the CUDA build of torch maps about
    450 MB of them at import)."""

    def __init__(self, every: float = 0.05):
        import threading

        self.every, self.anon_peak_mb = every, proc_status_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.anon_peak_mb = max(self.anon_peak_mb, proc_status_mb("RssAnon"))

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.anon_peak_mb = max(self.anon_peak_mb, proc_status_mb("RssAnon"))

    @property
    def peak_mb(self) -> float:
        return proc_status_mb("VmHWM")
