"""What an idle daemon costs: wake-ups per second per thread, CPU, RSS, and RSS by import.

One `gastown-sandboxd run` subprocess with a fresh 24 h token and a real cloud
(`gastown-cloud serve` over HTTPS, as a production cloud is, its town created there; the
daemon trusts the bench's own CA through SSL_CERT_DIR, a hashed folder read as the system's
would be): the start-up sync of the desired
configuration succeeds, so the next is 5 min away and the refresh 12 h, as in a settled
sandbox (against an unreachable cloud the sync retries after 5, 10, 20 … s, which an idle
window would count). `NOTIFY_SOCKET` is set to a datagram socket this process reads, as under
systemd. Over a window
(20 s, 10 s with `--quick`) the bench reads `/proc/PID/task/*/stat` and `status` at both ends:
context switches (voluntary + involuntary) per second per thread are its wake-ups.
Baseline in the same run: a bare interpreter in an asyncio loop that sleeps, same window.

RSS by import: a fresh interpreter per row imports the modules of the row (and of the rows
above it), then reports VmRSS; the step from the row above is what the row's modules add. Each
starts as the daemon's entry does, with rich, click and pygments hidden (`__main__.py`).

Start to ready: `STARTS` daemons one after another, from Popen to READY=1 on the notify
socket (the daemon sends it once both sockets listen); CPU is the child's utime+stime up to
then. Baseline in the same run: a bare interpreter from Popen to exit.

`python -m bench.idle_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.fixtures.daemon import make_town
from tests.fixtures.net import make_local_ca

from ._daemon import running_cloud, running_daemon
from ._stats import cpu_seconds, rss_kib, since, thread_counters
from ._table import Row, main_of

TOWN_ID = "town-idle-bench"
STARTS = 15
BARE_LOOP = "import asyncio; asyncio.run(asyncio.sleep(3600))"

# Cumulative import steps, in the order the daemon's start path meets them.
IMPORT_STEPS: tuple[tuple[str, str], ...] = (
    (
        "bare interpreter",
        "from gastown_sandboxd.__main__ import DAEMON_NEVER_USED, hide_never_used; "
        "hide_never_used(DAEMON_NEVER_USED)",
    ),
    ("asyncio", "import asyncio"),
    ("ssl", "import ssl"),
    ("anyio, structlog", "import anyio, structlog"),
    ("watchfiles", "import watchfiles"),
    ("starlette", "import starlette.applications, starlette.responses"),
    # As the servers import it: HTTP/2 and WebSocket left to their first use (`_hypercorn.py`).
    ("hypercorn", "import gastown_sandboxd._hypercorn"),
    ("httpx", "import httpx"),
    ("gastown_sandboxd.daemon, cli", "import gastown_sandboxd.daemon, gastown_sandboxd.cli"),
    ("+ prometheus_client (at the first scrape)", "import prometheus_client"),
    (
        "+ the client of an https:// cloud (`_http.cloud_client`)",
        "from gastown_sandboxd import _http; _http.cloud_client('https://c.test', timeout=9)",
    ),
)
# The last step's baseline, in its place: httpx's own default client, which reads certifi's
# bundle whole (what the daemon's client was before it read the system's CA folder).
HTTPX_DEFAULT_CLIENT = "import httpx; httpx.AsyncClient()"


@contextmanager
def _notify_socket(folder: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's; yields its path and the socket."""
    path = folder / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield str(path), sock
    finally:
        sock.close()


def _drain(sock: socket.socket) -> list[bytes]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096))
        except BlockingIOError:
            return messages


def wakeups(pid: int, window: float) -> tuple[dict[str, float], float]:
    """Wake-ups per second by thread name (threads of one name summed), and CPU % of a core."""
    before = thread_counters(pid)
    started = time.perf_counter()
    time.sleep(window)
    after = thread_counters(pid)
    elapsed = time.perf_counter() - started
    per_name: dict[str, float] = {}
    cpu = 0.0
    for tid, (name, seconds, switches) in since(before, after).items():
        label = name if tid != pid else f"{name} (main)"
        per_name[label] = per_name.get(label, 0.0) + switches / elapsed
        cpu += seconds
    return per_name, 100 * cpu / elapsed


def _bare_loop(window: float) -> tuple[float, float]:
    with subprocess.Popen([sys.executable, "-c", BARE_LOOP]) as child:
        try:
            time.sleep(1.0)  # past its start-up
            per_name, cpu = wakeups(child.pid, window)
        finally:
            child.kill()
    return sum(per_name.values()), cpu


def start_to_ready(workdir: Path, starts: int) -> tuple[list[float], list[float]]:
    """Seconds from Popen to READY=1, and the child's CPU seconds by then, per start."""
    walls: list[float] = []
    cpus: list[float] = []
    town = make_town(workdir / "town-ready", ("alpha",))
    for number in range(starts):
        folder = workdir / f"ready-{number}"
        folder.mkdir()
        with _notify_socket(folder) as (address, sock):
            sock.setblocking(True)
            sock.settimeout(30.0)
            env = {"NOTIFY_SOCKET": address}
            home = workdir / f"ready-home-{number}"
            with running_daemon(home, town, town_id=TOWN_ID, env=env, wait=False) as daemon:
                while b"READY=1" not in sock.recv(4096):
                    pass
                walls.append(time.perf_counter() - daemon.started)
                cpus.append(cpu_seconds(daemon.pid))
    return walls, cpus


def _bare_starts(starts: int) -> list[float]:
    walls = []
    for _ in range(starts):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        walls.append(time.perf_counter() - began)
    return walls


def rss_by_import() -> tuple[list[tuple[str, float]], float]:
    """(row, MiB) for each cumulative import step, each in a fresh interpreter; and the MiB
    with `HTTPX_DEFAULT_CLIENT` in place of the last step. Without SSL_CERT_FILE and
    SSL_CERT_DIR, as in a sandbox that sets neither (the daemon would read them)."""
    rows = []
    code = ""
    for label, statement in IMPORT_STEPS:
        before, code = code, f"{code}; {statement}" if statement else code
        rows.append((label, _rss_of(code)))
    return rows, _rss_of(f"{before}; {HTTPX_DEFAULT_CLIENT}")


def _rss_of(code: str) -> float:
    probe = (
        f"{code.lstrip('; ')}\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith('VmRSS:'): print(line.split()[1])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
    )
    return int(out.stdout.strip()) / 1024


def run(quick: bool) -> list[Row]:
    """Measure the idle daemon and the bare loop over the same window; then RSS by import."""
    window = 10.0 if quick else 20.0
    starts = 5 if quick else STARTS
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="idle-bench-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        ready_walls, ready_cpus = start_to_ready(workdir, starts)
        ca = make_local_ca(workdir / "ca")
        cloud_over_tls = running_cloud(workdir / "cloud", tls=ca)
        with _notify_socket(workdir) as (address, sock), cloud_over_tls as cloud:
            town_json, token = cloud.create_town(name="idle-bench")
            env = {"NOTIFY_SOCKET": address, **ca.trusting_env()}
            town = make_town(workdir / "town", ("alpha",))
            with running_daemon(
                workdir / "home",
                town,
                town_id=town_json["id"],
                token=token,
                cloud_url=cloud.url,
                key=cloud.internal_key,
                env=env,
            ) as daemon:
                rss_start = rss_kib(daemon.pid) / 1024
                time.sleep(1.0)  # let start-up's last timers run out
                _drain(sock)
                per_name, cpu = wakeups(daemon.pid, window)
                notices = len(_drain(sock))
                rss_idle = rss_kib(daemon.pid) / 1024
    base_wakeups, base_cpu = _bare_loop(window)
    note = f"{window:.0f} s window; baseline: a bare asyncio loop that sleeps"
    rows.append(Row("idle wake-ups, all threads", sum(per_name.values()), "/s", base_wakeups,
                    note))  # fmt: skip
    for name, rate in sorted(per_name.items(), key=lambda item: -item[1]):
        rows.append(Row(f"  thread {name}", rate, "/s"))
    rows += [
        Row("idle CPU", cpu, "% of a core", base_cpu, "all threads, utime+stime"),
        Row("sd_notify messages while idle", notices, "msgs", note="STATUS is event-driven"),
        Row("RSS after start", rss_start, "MiB", note="VmRSS once ready"),
        Row(f"RSS after {window:.0f} s idle", rss_idle, "MiB"),
    ]
    bare = statistics.median(_bare_starts(starts)) * 1000
    note = f"median of {starts} starts; baseline: a bare interpreter, Popen to exit"
    rows += [
        Row("start to ready (READY=1)", statistics.median(ready_walls) * 1000, "ms", bare, note),
        Row("  its CPU", statistics.median(ready_cpus) * 1000, "ms", note="utime+stime"),
    ]
    previous: float | None = None
    steps, httpx_default = rss_by_import()
    for label, mib in steps:
        note = "cumulative; the step is what the row adds" if previous is None else ""
        rows.append(Row(f"RSS import: {label}", mib, "MiB", previous, note))
        previous = mib
    note = "httpx's default client (certifi's bundle read whole) in the last row's place"
    rows.append(Row("RSS import: + httpx.AsyncClient() instead", httpx_default, "MiB", note=note))
    return rows


if __name__ == "__main__":
    quick = "10 s window, not 20 s"
    raise SystemExit(main_of(run, name="idle_bench", doc=__doc__, quick=quick, title="idle"))
