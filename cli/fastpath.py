"""`know run` / `know study` on a finished output folder: done before any engine starts.

A finished command leaves `done.json` (storage/done.py). Running the same command again,
this module finds the folder from the command line, and only when a record is there parses
the options, checks that the record is current (same settings, same store runs, intact
products) and returns what the command would have printed. Otherwise it returns None and the
command runs as usual: no Prefect server is started, no flow run is made, for work that is
already done. Any doubt (a parse error, an unreadable record) means "run as usual", where the
normal checks report it.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

#: command -> (default preset, output folder of a preset)
COMMANDS = {"run": ("standard", "results/{}"), "study": ("screen", "results/study-{}")}


def pop_option(argv: list[str], name: str) -> tuple[list[str], str | None]:
    """argv without `name VALUE` / `name=VALUE`, and VALUE (None when absent)."""
    for i, arg in enumerate(argv):
        if arg == name:
            if i + 1 >= len(argv):
                from know_core.errors import BadInput

                raise BadInput(f"{name} needs a value")
            return argv[:i] + argv[i + 2:], argv[i + 1]
        if arg.startswith(name + "="):
            return argv[:i] + argv[i + 1:], arg.split("=", 1)[1]
    return argv, None


def candidate_out(argv: list[str]) -> Path | None:
    """The output folder the command line names, without importing anything heavy."""
    if not argv or argv[0] not in COMMANDS or any(a in ("--help", "-h") for a in argv):
        return None
    from know_core.errors import BadInput

    try:
        return _candidate_out(argv)
    except BadInput:  # an option without its value: the normal path says so
        return None


def _candidate_out(argv: list[str]) -> Path | None:
    default_preset, pattern = COMMANDS[argv[0]]
    values = {}
    config = pop_option(argv, "--config")[1] if argv[0] == "run" else None
    if config:
        try:
            values = tomllib.loads(Path(config).read_text())
        except (OSError, ValueError):
            return None
    out = pop_option(argv, "--out")[1] or values.get("out")
    preset = pop_option(argv, "--preset")[1] or values.get("preset") or default_preset
    return Path(out or pattern.format(preset))


def finished_output(argv: list[str]) -> str | None:
    """What the command prints when its output folder already holds its finished result; None
    when there is work to do (or any doubt)."""
    out = candidate_out(argv)
    if out is None or not (out / "done.json").is_file():
        return None
    try:
        from storage.done import is_done

        from .commands import app, apply_config

        _, bound, _ = app.parse_args(apply_config(argv), exit_on_error=False, print_error=False)
        p = bound.kwargs.get("p") or bound.signature.parameters["p"].default  # no options: the defaults
        if Path(p.out) != out or not is_done(p.out, p.done_identity()):
            return None
        if argv[0] == "study" and not all(is_done(e.out, e.done_identity()) for e in p.experiments(every=True).values()):
            return None  # a variant's runs or products changed (the store is the variants')
    except Exception:  # noqa: BLE001 - the normal path reports bad options properly
        return None
    name = "summary.md" if argv[0] == "run" else "study.md"
    return (f"{(out / name).read_text()}\n"
            f"done: {out} already holds this {'experiment' if argv[0] == 'run' else 'study'}, finished and unchanged "
            f"(done.json); nothing to do. Delete {out / 'done.json'} to check every stage again.")
