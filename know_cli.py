"""`know`: the command line. Every command takes its stage model's fields as options
(params/), runs the stage's pre-flight checks, then its flow (cli/commands.py).

    know collect --store runs.zarr --dataset digits --models simple-cnn --runs 4 --stages 5 --seed 0
    know runs --store runs.zarr

Bad input exits 2 with one line on stderr that names the option or file to fix; a bug exits
1 with a short traceback and the path of the full one (cli/errors.py).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# Prefect settings must exist before prefect is imported: no analytics (no internet here), a
# project-local home so runs and the ephemeral database stay with the project, and no task
# results persisted or read back: Prefect deserializes a stored result with the serializer its
# record names, pickle included, and files are untrusted. Nothing is lost: the store, the
# prediction hashes and the cells folder are the cache that makes re-runs skip finished work.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
os.environ.setdefault("PREFECT_TASKS_DISABLE_CACHING", "true")
os.environ.setdefault("PREFECT_RESULTS_DEFAULT_SERIALIZER", "json")
if str(ROOT) not in sys.path:  # run as a script (python know_cli.py ...) from anywhere
    sys.path.insert(0, str(ROOT))

from cli.commands import app  # noqa: E402
from cli.errors import run_guarded  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    run_guarded(lambda: app(argv, exit_on_error=False, print_error=False))
    raise SystemExit(0)


if __name__ == "__main__":
    main()
