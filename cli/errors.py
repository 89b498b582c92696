"""How a `know` command ends: domain errors and bad options as one line with exit 2, a disk
that refuses a write (full, over quota, read-only, no permission) as one line naming the path
and the fix, exit 2, an unreachable or refusing Prefect API as one line naming its settings,
Ctrl-C as one line and exit 130 (`interrupts`: training in worker threads stops too), and
anything else (a bug) as a short traceback, exit 1, and the path of the full log."""
from __future__ import annotations

import datetime as _dt
import errno
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path

from .display import console

EXIT_BAD_INPUT = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    from rich.markup import escape

    # escaped: a message may hold [brackets] (a TOML key, a list) that rich would eat as markup
    console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True, markup=True)
    raise SystemExit(code)


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def api_problem(error: BaseException) -> str | None:
    """One line for a Prefect API that cannot be reached or refuses us, else None."""
    import httpx

    url = os.environ.get("PREFECT_API_URL", "")
    for e in _chain(error):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return (f"the Prefect API at {url or '(PREFECT_API_URL)'} refused the request (HTTP {status}); set "
                    "PREFECT_API_AUTH_STRING=user:password to the server's credentials")
        if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)) or "Failed to reach API" in str(e):
            ours = getattr(sys.modules.get("cli.server"), "current", None)
            if ours is not None and url == ours.api_url:
                return (f"the temporary Prefect server at {url} stopped answering ({type(e).__name__}); see "
                        f"{ours.log_path}; finished work is kept, run the same command again to resume")
            return (f"cannot reach the Prefect API at {url or '(PREFECT_API_URL)'}: {type(e).__name__}; start the "
                    "server or fix PREFECT_API_URL (unset it to run on a temporary local server)")
    return None


def error_log_path() -> Path:
    return Path(os.environ.get("PREFECT_HOME", ".prefect")) / "know-errors.log"


def report_bug(error: BaseException) -> None:
    """Short traceback on stderr, the whole one appended to the error log; exit 1."""
    full = "".join(traceback.format_exception(error))
    log = error_log_path()
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"--- {_dt.datetime.now().isoformat(timespec='seconds')} know {' '.join(sys.argv[1:])}\n{full}\n")
        where = f"full traceback in {log}"
    except OSError:
        where = "the full traceback could not be saved"
    short = "".join(traceback.format_exception(error, limit=-4, chain=False))
    sys.stderr.write(short)
    console.print(f"[bold red]bug:[/] {type(error).__name__} is not a user error; {where}. Please report it.",
                  highlight=False, soft_wrap=True)
    raise SystemExit(EXIT_BUG)


#: errno values of a disk the command cannot write: what it is, and the fix (for a path there)
DISK_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space there"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or raise the quota"),
    errno.EROFS: ("read-only file system", "remount it read-write"),
    errno.EACCES: ("permission denied", "fix its permissions"),
}


def _path_options() -> list[tuple[str, str]]:
    """(flag, value) of this command line's options that name a local path (--store, --out, ...)."""
    argv = sys.argv[1:]
    return [(flag, value) for flag, value in zip(argv, argv[1:])
            if flag.startswith("--") and value and not value.startswith("-") and "://" not in value]


def _option_for(path: str) -> str:
    """How to point the command elsewhere: the option whose value holds `path`, else PREFECT_HOME."""
    target = os.path.abspath(path)
    for flag, value in _path_options():
        root = os.path.abspath(value)
        if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
            return f"pass another {flag}"
    home = os.path.abspath(os.environ.get("PREFECT_HOME", ".prefect"))
    if target == home or target.startswith(home + os.sep):
        return "set PREFECT_HOME to another directory"
    return "pass another --store / --out"


def disk_problem(error: BaseException) -> str | None:
    """One line for a write that the disk refused (full, over quota, read-only, no permission):
    the path and what to free or change, else None. Walks the exception chain, so an OSError
    inside a task's failure (or a StoreError around it) is found."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            what, fix = DISK_ERRORS[e.errno]
            verb = "on" if e.errno == errno.EACCES else "writing"  # EACCES may come from a read
            if e.filename is None:
                return (f"{what}; free space on, or fix, the disk that the command writes to (its store, --out "
                        "or PREFECT_HOME), or pass another --store / --out")
            path = os.fsdecode(e.filename)
            if os.path.isabs(path):
                return f"{what} {verb} {path}; {fix} or {_option_for(path)}"
            # a name relative to a directory fd (shutil.rmtree): say which option's path it is under
            store = next((value for flag, value in _path_options() if flag == "--store"), None)
            where = f" in {store}" if store else ""
            hint = "pass another --store" if store else "pass another --store / --out"
            return f"{what} {verb} {path}{where}; {fix} or {hint}"
    return None


def user_fixable(error: BaseException) -> bool:
    """An interrupt, a domain error or a refused disk write anywhere in the chain: what the
    final one-line message explains, so its traceback is noise on the console."""
    from know_core.errors import KnowError

    return disk_problem(error) is not None or any(isinstance(e, (KeyboardInterrupt, KnowError)) for e in _chain(error))


def quiet_console_tracebacks() -> None:
    """Prefect's console log (on stderr) keeps its one-line records, but leaves out the
    traceback of a user-fixable error; the API log handler still sends it whole to the
    Prefect server. Call once Prefect's logging is set up (import prefect.main)."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if not isinstance(handler, PrefectConsoleHandler) or getattr(handler, "_know_quiet", False):
            continue
        plain = handler.format

        def format(record, plain=plain):
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None and user_fixable(exc):
                record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
            return plain(record)

        handler.format = format
        handler._know_quiet = True


_interrupts = 0


def _stop_training() -> None:
    """Ask every training loop (also in Prefect's worker threads) to stop at its next batch."""
    train = sys.modules.get("know_core.train")
    if train is not None:
        train.STOP.set()


@contextmanager
def interrupts(on_second=None):
    """Ctrl-C while a command runs: the first SIGINT stops training loops in every thread and
    raises KeyboardInterrupt in the main thread (the flows unwind, record the runs as crashed,
    and run_guarded exits 130); a second one quits at once, after `on_second()` (which kills
    the temporary server). Only the main thread can install a handler; elsewhere a no-op."""
    global _interrupts
    train = sys.modules.get("know_core.train")
    if train is not None:
        train.STOP.clear()  # a previous interrupted command in this process
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        global _interrupts
        _interrupts += 1
        _stop_training()
        if _interrupts == 1:
            raise KeyboardInterrupt
        try:
            if on_second is not None:
                on_second()
        finally:
            os.write(2, b"error: interrupted again; stopped at once, run the same command again to resume\n")
            os._exit(EXIT_INTERRUPTED)

    _interrupts = 0
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupts = 0


def run_guarded(call) -> None:
    """Run `call()` (the cyclopts app) and turn how it ends into the exit codes above."""
    try:
        call()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _stop_training()
        fail("interrupted; finished work is kept, run the same command again to resume", EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001
        _fail_for(e)


def _fail_for(e: Exception) -> None:
    """Exit 2 with one line for what the user can fix, else report a bug (exit 1)."""
    from cyclopts.exceptions import CycloptsError
    from pydantic import ValidationError

    from know_core.errors import KnowError, one_line

    problem = disk_problem(e)
    if problem:
        fail(problem)
    if isinstance(e, CycloptsError):
        from params.common import describe

        cause = e.__cause__
        fail(describe(cause) if isinstance(cause, ValidationError) else one_line(e))
    if isinstance(e, ValidationError):
        from params.common import describe

        fail(describe(e))
    if isinstance(e, KnowError):
        fail(one_line(e))
    problem = api_problem(e)
    if problem:
        fail(problem)
    report_bug(e)
