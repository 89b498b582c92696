"""`know`: the command line. Every command takes its stage model's fields as options
(params/), runs the stage's pre-flight checks, then its flow (cli/commands.py).

    know collect --store runs.zarr --dataset digits --models simple-cnn --runs 4 --stages 5 --seed 0
    know runs --store runs.zarr

Bad input exits 2 with one line on stderr that names the option or file to fix, and so does
a full or read-only disk; Ctrl-C exits 130 with one line; a bug exits 1 with a short
traceback and the path of the full one (cli/errors.py).

Without PREFECT_API_URL, a command that runs flows starts its own temporary Prefect server
(cli/server.py): in its own process group, so Ctrl-C reaches only the CLI, which records the
interrupted flow runs and then stops the server last; and killed by the kernel when the
CLI dies, even by `kill -9`.
"""
from __future__ import annotations

import gc
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

from cli.errors import interrupts, run_guarded  # noqa: E402 - light: no torch, no prefect


def main(argv: list[str] | None = None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    server = None
    own_process = "prefect" not in sys.modules  # the `know` process, not an in-process caller (tests)

    def command():
        nonlocal server
        from cli.fastpath import finished_output
        from cli.server import needs_server, start_if_needed

        finished = finished_output(argv)  # a finished `run`/`study` folder: no server, no flows
        if finished is not None:
            sys.stdout.write(finished + "\n")
            return None
        if argv[:1] == ["predict"]:  # before any thread exists: memory stays at one block's (tasks/heap.py)
            from tasks.heap import one_heap

            one_heap()
        server = start_if_needed(argv)  # spawned first: it boots while torch and the flows import
        if own_process and needs_server(argv):
            import prefect.main  # noqa: F401 - sets up Prefect's logging (the flows need it anyway)

            from cli.errors import quiet_console_tracebacks

            quiet_console_tracebacks()
        from cli.commands import app, apply_config

        args = apply_config(argv)  # `know run --config FILE.toml`

        app.suppress_keyboard_interrupt = False  # Ctrl-C reaches run_guarded: one line, exit 130
        if server is None:
            return app(args, exit_on_error=False, print_error=False)
        cmd, bound, _ = app.parse_args(args, exit_on_error=False, print_error=False)  # bad options: no wait
        server.wait_ready()
        return cmd(*bound.args, **bound.kwargs)

    try:
        with interrupts(on_second=lambda: server and server.kill()):
            try:
                run_guarded(command)
            finally:
                try:
                    if server is not None:  # last: the flows have recorded how they ended
                        server.stop()
                    elif own_process and "prefect" in sys.modules:  # a user's server: send the logs
                        from cli.server import drain_prefect_workers  # now, quietly, not after the last line

                        drain_prefect_workers()
                except KeyboardInterrupt:  # Ctrl-C meanwhile: stop at once, still one line
                    if server is not None:
                        server.kill()
                    sys.stderr.write("error: interrupted while shutting down; run the same command again to resume\n")
                    raise SystemExit(130) from None
    finally:
        if own_process:  # about to exit: spare the interpreter's last full GC over torch's and
            gc.freeze()  # Prefect's objects (2-4 s of CPU; far longer on a busy machine)
    raise SystemExit(0)


if __name__ == "__main__":
    main()
