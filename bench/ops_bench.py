"""How fast the daemon is gone after SIGTERM.

Real `gastown-sandboxd run` processes (`bench/_daemon.py`), their cloud a closed port.

- stop: from `send_signal(SIGTERM)` to the process reaped (`waitpid`, woken by a pidfd the
  moment the process ends: `reaped`), median and worst of N, in four states: idle; with an
  SSE client connected to `/events`; with a hook running (a `sleep 60` started by a
  `config.changed`); with a refresh hanging on a cloud that accepts and never answers.
  Baseline in the same run: a bare Python process that exits on SIGTERM through `sys.exit`
  (the interpreter's own tear-down), and one that first imports the daemon.

`python -m bench.ops_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import httpx
from httpx_sse import connect_sse
from tests.daemon.minting import DAY, mint

from ._daemon import NO_CLOUD, Daemon, running_daemon
from ._table import Row, main_of

TOWN = "town-ops-bench"
HOOK_TOML = '[[hooks]]\nevents = ["config.changed"]\ncommand = ["sleep", "60"]\ntimeout = "120s"\n'
_BARE = (
    "import signal, sys\n"
    "{imports}"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "print('ready', flush=True)\n"
    "signal.pause()\n"
)


REAP_DEADLINE = 30.0


def reaped(process: subprocess.Popen[bytes], timeout: float = REAP_DEADLINE) -> int:
    """Wait for `process` to end, reap it and give its exit status; `TimeoutExpired` if it
    is still running after `timeout` seconds (it is then left running).

    A pidfd is readable the moment its process ends. `Popen.wait(timeout)` polls instead,
    with sleeps that double from 1 ms to 50 ms, so an end is seen 0, 1, 3, 7, 15, 31 or
    63 ms after the call: every stop time of the full run before this read 31-32 or 64 ms.
    """
    pidfd = os.pidfd_open(process.pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(process.args, timeout)
    finally:
        os.close(pidfd)
    return process.wait()


def _python_stop_ms(imports: str) -> float:
    """SIGTERM to reaped for a Python process that exits through `sys.exit`."""
    code = _BARE.format(imports=imports)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"
        started = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        reaped(process)
        return (time.perf_counter() - started) * 1000


def _daemon_stop_ms(daemon: Daemon) -> float:
    started = time.perf_counter()
    daemon.process.send_signal(signal.SIGTERM)
    reaped(daemon.process)
    return (time.perf_counter() - started) * 1000


@contextmanager
def _sse_client(daemon: Daemon) -> Iterator[None]:
    """An `/events` client that stays connected until the daemon ends the stream."""
    connected = threading.Event()

    def follow() -> None:
        transport = httpx.HTTPTransport(uds=str(daemon.socket))
        timeout = httpx.Timeout(5.0, read=60.0)
        with httpx.Client(transport=transport, base_url="http://d", timeout=timeout) as client:
            try:
                with connect_sse(client, "GET", "/events") as source:
                    connected.set()
                    for _ in source.iter_sse():
                        pass
            except httpx.TransportError:
                pass

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    if not connected.wait(10):
        raise RuntimeError("the SSE client did not connect")
    yield
    thread.join(10)


def _start_hook(daemon: Daemon) -> None:
    """A PATCH whose `config.changed` starts the hanging hook; back once it is running."""
    headers = {"x-internal-api-key": daemon.key}
    body = {"town": {"role_effort": {"mayor": "high"}}}
    answer = httpx.patch(f"{daemon.url}/config", json=body, headers=headers, timeout=10)
    answer.raise_for_status()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(_is_sleep(child) for child in _children(daemon.pid)):
            return
        time.sleep(0.01)
    raise RuntimeError("the hook did not start")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _is_sleep(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
    except OSError:
        return False


@contextmanager
def _silent_cloud() -> Iterator[str]:
    """A cloud URL that accepts connections and never answers (a refresh hangs on it)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def _stop_times(
    runs: int,
    prepare: Callable[[Daemon], object],
    *,
    toml: str | None = None,
    cloud: str = NO_CLOUD,
) -> list[float]:
    """SIGTERM-to-exit of `runs` fresh daemons, each brought into a state by `prepare`.

    With a `cloud` other than the closed port, the token on disk is past its half-life, so
    that the daemon refreshes at once.
    """
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="ops-bench-") as folder:
            home, town = Path(folder) / "home", Path(folder) / "town"
            (town / "settings").mkdir(parents=True)
            config = None
            if toml is not None:
                config = Path(folder) / "config.toml"
                config.write_text(toml)
            token = None if cloud == NO_CLOUD else mint(time.time() - 0.75 * DAY, town_id=TOWN)
            with (
                running_daemon(
                    home, town, town_id=TOWN, cloud_url=cloud, token=token, config=config
                ) as daemon,
                ExitStack() as stack,
            ):
                prepared = prepare(daemon)
                if isinstance(prepared, AbstractContextManager):
                    stack.enter_context(prepared)
                times.append(_daemon_stop_ms(daemon))
    return times


def _row(name: str, times: list[float], baseline: float, note: str = "") -> Row:
    worst = f"worst {max(times):.0f} ms of {len(times)}"
    return Row(name, statistics.median(times), "ms", baseline, f"{worst}; {note}".rstrip("; "))


def run(quick: bool) -> list[Row]:
    runs = 3 if quick else 10
    bare = statistics.median(_python_stop_ms("") for _ in range(runs))
    imported = statistics.median(
        _python_stop_ms("import gastown_sandboxd.daemon\n") for _ in range(runs)
    )
    idle = _stop_times(runs, lambda daemon: None)
    streaming = _stop_times(runs, _sse_client)
    hooked = _stop_times(runs, _start_hook, toml=HOOK_TOML)
    with _silent_cloud() as silent:
        hanging = _stop_times(runs, _refresh_started, cloud=silent)
    return [
        Row("bare Python, SIGTERM to exit", bare, "ms", note="sys.exit from a handler"),
        Row("Python importing the daemon", imported, "ms", bare, "the same, after the imports"),
        _row("daemon idle, SIGTERM to exit", idle, imported, "contract: within 1 s"),
        _row("daemon with an SSE client", streaming, imported),
        _row("daemon with a hook running", hooked, imported, "the hook's group is killed"),
        _row("daemon with a refresh hanging", hanging, imported, "cloud accepts, never answers"),
    ]


def _refresh_started(daemon: Daemon) -> None:
    """Back once the daemon's start-up refresh is in flight (state `refreshing`)."""
    deadline = time.monotonic() + 10
    transport = httpx.HTTPTransport(uds=str(daemon.socket))
    with httpx.Client(transport=transport, base_url="http://d", timeout=5) as client:
        while time.monotonic() < deadline:
            if client.get("/status").json()["state"] == "refreshing":
                return
            time.sleep(0.01)
    raise RuntimeError("the refresh did not start")


if __name__ == "__main__":
    quick = "3 runs of each instead of 10"
    raise SystemExit(main_of(run, name="ops_bench", doc=__doc__, quick=quick, title="operations"))
