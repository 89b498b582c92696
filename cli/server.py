"""The temporary Prefect server of one `know` command, owned by the CLI process.

When no Prefect API is configured (PREFECT_API_URL unset), Prefect would start a temporary
server itself, lazily, from whichever thread first needs a client, in the CLI's process
group. Then Ctrl-C (SIGINT to the group) kills the server before the flow can record how it
ended, and `kill -9` of the CLI leaves the server running. Instead the CLI starts the server
here, from its main thread and before any flow runs:

* in its own session and process group, so a terminal's Ctrl-C never reaches it;
* with PR_SET_PDEATHSIG = SIGTERM, so the kernel stops it when the CLI dies, even by SIGKILL;
* bound to 127.0.0.1 on a free port, its output in PREFECT_HOME/know-server.log;
* with PREFECT_API_URL set to it (for this process and every child, e.g. Dask workers);
* stopped last, after Prefect's log and event workers have sent what they hold.

Starting the process costs nothing here; it boots (6-13 s) while the CLI imports torch and
the flows, and `wait_ready` waits only for what is left. A user-set PREFECT_API_URL (or
PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false) is respected: no server is started.
"""
from __future__ import annotations

import atexit
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from know_core.errors import KnowError

#: commands that run flows and so need a Prefect API (`submit` needs a real server)
FLOW_COMMANDS = frozenset({"collect", "trajectory", "meta-train", "predict", "run", "study", "import-release", "resume"})
HELP_FLAGS = frozenset({"-h", "--help", "--version"})

_PR_SET_PDEATHSIG = 1

#: the server this process published as PREFECT_API_URL (for error messages), if any
current: "TemporaryServer | None" = None


class ServerStartError(KnowError):
    """The temporary Prefect server did not come up; the message names its log."""


def command_of(argv: list[str]) -> str:
    """The command name of a `know` argv ('' when none)."""
    return next((a for a in argv if not a.startswith("-")), "")


def needs_server(argv: list[str]) -> bool:
    """Whether this command line runs flows (and is not a request for help)."""
    return command_of(argv) in FLOW_COMMANDS and not HELP_FLAGS.intersection(argv)


def api_configured() -> bool:
    """True when Prefect already has an API to talk to, or may not start a temporary one.

    Reads Prefect's settings (environment, profile, prefect.toml), so a URL set anywhere
    Prefect looks for one is used as is."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return bool(settings.api.url) or not settings.server.ephemeral.enabled


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent_hook():
    """A preexec_fn: the child gets SIGTERM when this process (the thread forking it, here
    the main thread) dies; exits at once if the parent is already gone. None off Linux."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # resolved before fork: no dlopen in the child
    if prctl is None or not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return hook


class TemporaryServer:
    """One Prefect API server (uvicorn + prefect.server.api.server:create_app) for this CLI."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home or os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
        self.log_path = self.home / "know-server.log"
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.ready = False
        self._set_env = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> "TemporaryServer":
        """Spawn the server (returns at once); `publish` then points Prefect at it."""
        self.home.mkdir(parents=True, exist_ok=True)
        self._spawn()
        atexit.register(self.stop)  # a backstop; `know_cli.main` stops it explicitly
        return self

    def publish(self) -> None:
        """Set PREFECT_API_URL to this server, for this process's Prefect and its children."""
        global current
        os.environ["PREFECT_API_URL"] = self.api_url
        os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: no "View at" links to nowhere
        self._set_env = True
        current = self
        if "prefect.context" in sys.modules:
            _refresh_prefect_settings()

    def _spawn(self) -> None:
        from importlib.util import find_spec

        prefect_dir = Path(find_spec("prefect").origin).resolve().parent  # without importing prefect
        self.port = _free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")}
        env.pop("PREFECT_API_URL", None)
        args = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent),
                "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on"]
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} know pid {os.getpid()}, port {self.port}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.process = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_die_with_parent_hook(), close_fds=True)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(getattr(self, "_log_offset", 0))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the server answers /api/health (it boots while the CLI imports)."""
        if self.ready or self.process is None:
            return
        import httpx

        deadline = time.monotonic() + timeout
        retries = 2
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    tail = self._log_tail()
                    if retries and ("address already in use" in tail.lower() or f"[errno {errno.EADDRINUSE}]" in tail.lower()):
                        retries -= 1  # lost the race for the free port: another one
                        self._spawn()
                        if self._set_env:
                            self.publish()
                        continue
                    last = next((ln for ln in reversed(tail.strip().splitlines()) if ln.strip()), "no output")
                    raise ServerStartError(f"the temporary Prefect server exited with code {code} while starting "
                                           f"({last.strip()[:200]}); see {self.log_path}, or set PREFECT_API_URL to a "
                                           "running server")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        self.ready = True
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerStartError(f"the temporary Prefect server did not answer within {timeout:.0f}s; see "
                                           f"{self.log_path}, or set PREFECT_API_URL to a running server")
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the server's process group now (for a second Ctrl-C); no waiting."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, grace: float = 5.0, drain: bool = True) -> None:
        """Flush Prefect's log and event workers to the server (unless not `drain`), then
        SIGTERM its process group (SIGKILL after `grace` s). Safe to call more than once."""
        proc, self.process = self.process, None
        if proc is not None:
            if drain and self.ready and proc.poll() is None:
                drain_prefect_workers()
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    proc.wait()
            else:
                proc.wait()
        self.ready = False
        # PREFECT_API_URL keeps naming the stopped server: were it unset, a late Prefect
        # client (an exit handler) would start a temporary server of its own


def _refresh_prefect_settings() -> None:
    """Make Prefect's process-wide settings read the environment again (PREFECT_API_URL)."""
    import prefect.context

    prefect.context.refresh_global_settings_context()


def drain_prefect_workers(timeout: float = 5.0) -> None:
    """Send the logs and events Prefect still holds while the server is up (only for the
    workers this process started; nothing is imported for it)."""
    import logging

    for module, name in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        mod = sys.modules.get(module)
        if mod is None:
            continue
        progress = logging.getLogger(name)  # its "Still processing items" notes would follow the last line
        level = progress.level
        progress.setLevel(logging.ERROR)
        try:
            getattr(mod, name).drain_all(timeout=timeout)
        except Exception:  # noqa: BLE001 - never turn a finished command into a failure
            pass
        finally:
            progress.setLevel(level)


def start_if_needed(argv: list[str]) -> TemporaryServer | None:
    """This command's temporary server, when it runs flows and no Prefect API is configured.

    The process is spawned before Prefect is imported (so it boots meanwhile), then dropped
    again if Prefect's settings name an API after all (a profile or prefect.toml). When the
    caller imported Prefect already (know_cli.main called in-process, e.g. by tests with a
    prefect_test_harness), Prefect's own handling applies and nothing is started here."""
    if not needs_server(argv) or os.environ.get("PREFECT_API_URL"):
        return None
    if "prefect" in sys.modules:  # an in-process caller (tests): it set up Prefect itself
        return None
    server = TemporaryServer().start()
    if api_configured():
        server.stop()
        return None
    server.publish()
    return server
