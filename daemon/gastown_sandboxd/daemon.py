"""Assembly: every component in one task group, started in order, stopped on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import anyio
import structlog
from prometheus_client import CollectorRegistry

from gastown_sandboxd._types import Clock, SystemClock
from gastown_sandboxd.atomic import remove_stale_temporaries
from gastown_sandboxd.errors import SettingsError
from gastown_sandboxd.events.bus import EventBus
from gastown_sandboxd.events.notify import Notifier
from gastown_sandboxd.gtsettings.store import SettingsStore
from gastown_sandboxd.http.app import ApiContext, create_app
from gastown_sandboxd.http.server import bind_tcp, bind_unix, describe, serve_socket
from gastown_sandboxd.ops.metrics import DaemonMetrics, TokenMetrics
from gastown_sandboxd.ops.systemd import SystemdNotifier
from gastown_sandboxd.options import Settings
from gastown_sandboxd.token.cloud import CloudClient
from gastown_sandboxd.token.refresher import TokenRefresher
from gastown_sandboxd.watcher import SettingsWatcher

log = structlog.get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def check_town_root(path: Path) -> None:
    """The town root must be a folder the daemon can read and enter; else exit 2."""
    try:
        is_folder = path.is_dir()
    except OSError as exc:  # a folder above it that the daemon may not enter (EACCES)
        raise SettingsError(
            "town root (GT_TOWN_ROOT)",
            f"{path} cannot be reached ({exc.strerror})",
            "give the daemon's user access to the folders above it",
        ) from None
    if not is_folder:
        raise SettingsError(
            "town root (GT_TOWN_ROOT)", f"{path} is not a folder", "create it or set GT_TOWN_ROOT"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise SettingsError(
            "town root (GT_TOWN_ROOT)",
            f"{path} cannot be read",
            "give the daemon's user read access",
        )


async def run_daemon(
    settings: Settings,
    *,
    clock: Clock | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM or SIGINT (or cancellation); raises SettingsError before serving."""
    check_town_root(settings.town_root)
    clock = clock or SystemClock()
    systemd = SystemdNotifier()
    registry = CollectorRegistry()
    bus = EventBus()
    store = SettingsStore(
        town_root=settings.town_root, emit=bus.emit, extra_presets=settings.extra_presets
    )
    client = CloudClient(
        base_url=settings.cloud_url,
        internal_key=settings.internal_key.reveal(),
        town_id=settings.town_id,
        timeout=settings.refresh_timeout,
    )
    refresher = TokenRefresher(
        town_id=settings.town_id,
        env_file=settings.env_file,
        client=client,
        emit=bus.emit,
        clock=clock,
        policy=settings.schedule,
        metrics=TokenMetrics(registry, on_state=systemd.report_state),
    )
    watcher = SettingsWatcher(
        town_root=settings.town_root,
        env_file=settings.env_file,
        folders=store.watched_folders,
        on_settings_change=store.reconcile_external,
        on_env_change=refresher.reload_env_file,
        debounce_ms=settings.watch_debounce_ms,
        step_ms=settings.watch_step_ms,
    )
    notifier = Notifier(bus=bus, hooks=settings.hooks, signals=settings.signals)
    metrics = DaemonMetrics(registry, bus=bus, notifier=notifier, watcher=watcher)
    ctx = ApiContext(
        town_id=settings.town_id,
        town_root=settings.town_root,
        refresher=refresher,
        store=store,
        bus=bus,
        registry=registry,
        clock=clock,
        watcher_status=watcher.status,
        patch_counter=metrics.config_patches,
        sse_clients=metrics.sse_clients,
    )
    tcp = bind_tcp(settings.listen)
    try:
        unix = bind_unix(settings.socket)
    except OSError:
        tcp.close()
        raise
    shutdown = anyio.Event()

    async with client, anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, shutdown, bus)
        await store.load()
        await anyio.to_thread.run_sync(
            _remove_stale_temporaries, settings.env_file, store.watched_folders()
        )
        await tg.start(refresher.run)
        await tg.start(notifier.run)
        await tg.start(watcher.run)
        await tg.start(systemd.run_watchdog)
        async with anyio.create_task_group() as servers:
            for app, sock in (
                (create_app(ctx, key=settings.internal_key.reveal()), tcp),
                (create_app(ctx, key=None), unix),
            ):
                log.info("api_listening", address=describe(sock))
                servers.start_soon(serve_socket, app, sock, shutdown)
            systemd.notify("READY=1", f"STATUS=serving; token {refresher.status().state}")
            log.info("daemon_ready", town_id=settings.town_id, state=refresher.status().state)
            task_status.started()
        # The servers return once `shutdown` is set and their connections closed.
        tg.cancel_scope.cancel()
    _remove_socket(settings.socket)
    log.info("daemon_stopped")


async def _stop_on_signal(shutdown: anyio.Event, bus: EventBus) -> None:
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("daemon_stopping", signal=signal.Signals(signum).name)
            SystemdNotifier().notify("STOPPING=1")
            # Ending the event streams lets hypercorn close SSE connections at once.
            bus.close()
            shutdown.set()
            return


def _remove_stale_temporaries(env_file: Path, folders: list[Path]) -> None:
    """Temporary files of writes a SIGKILL interrupted (they may hold a token: 0600)."""
    remove_stale_temporaries(env_file)
    for folder in folders:
        remove_stale_temporaries(folder / "config.json")


def _remove_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
