"""How a `know` command ends: domain errors and bad options as one line with exit 2, an
unreachable or refusing Prefect API as one line naming its settings, Ctrl-C as exit 130,
and anything else (a bug) as a short traceback, exit 1, and the path of the full log."""
from __future__ import annotations

import datetime as _dt
import os
import sys
import traceback
from pathlib import Path

from .display import console

EXIT_BAD_INPUT = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
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


def run_guarded(call) -> None:
    """Run `call()` (the cyclopts app) and turn how it ends into the exit codes above."""
    from cyclopts.exceptions import CycloptsError
    from pydantic import ValidationError

    from know_core.errors import KnowError, one_line
    from params.common import describe

    try:
        call()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        fail("interrupted; finished work is kept, run the same command again to resume", EXIT_INTERRUPTED)
    except CycloptsError as e:
        cause = e.__cause__
        fail(describe(cause) if isinstance(cause, ValidationError) else one_line(e))
    except ValidationError as e:
        fail(describe(e))
    except KnowError as e:
        fail(one_line(e))
    except Exception as e:  # noqa: BLE001
        problem = api_problem(e)
        if problem:
            fail(problem)
        report_bug(e)
