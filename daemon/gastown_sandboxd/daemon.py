"""Assembly: every component in one task group, started in order, stopped on SIGTERM/SIGINT.

SIGHUP re-reads the options (`reload_options`): hooks, signals and the schedule knobs change in
place; connections and event streams stay open; a bad file is refused and the old options stay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import structlog

from gastown_sandboxd._types import Clock, SystemClock
from gastown_sandboxd.agents import AgentKeeper
from gastown_sandboxd.atomic import remove_stale_temporaries
from gastown_sandboxd.errors import OptionsError
from gastown_sandboxd.events import EventBus, Notifier, run_first_id
from gastown_sandboxd.gtsettings import (
    CONFIG,
    ConfigSync,
    DesiredConfigClient,
    LastApplied,
    SettingsStore,
)
from gastown_sandboxd.http import (
    ApiContext,
    bind_tcp,
    bind_unix,
    create_app,
    describe,
    serve_socket,
)
from gastown_sandboxd.http.local_socket import LocalSocket
from gastown_sandboxd.ops import DaemonMetrics, MetricsRegistry, SocketLock, SystemdNotifier
from gastown_sandboxd.options import (
    Options,
    check_env_folder,
    check_shim_dir,
    check_socket_path,
    check_town_root,
)
from gastown_sandboxd.token import CloudClient, TokenRefresher, read_token, token_metrics
from gastown_sandboxd.watcher import SettingsWatcher

log = structlog.get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL = signal.SIGHUP
# Options a reload applies in place; any other change waits for a restart (and is logged).
RELOADABLE = frozenset(
    {"hooks", "signals", "schedule", "agent_shims", "claude_helper_ttl", "config_sync_interval"}
)


async def run_daemon(
    options: Options,
    *,
    clock: Clock | None = None,
    reload: Callable[[], Options] | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM or SIGINT (or cancellation); raises OptionsError before serving.

    `reload` reads the options again on SIGHUP (without it, SIGHUP re-reads nothing and is
    logged). A second daemon on the same socket raises `SocketInUse` (a OptionsError).
    """
    for deprecation in options.deprecations:
        log.warning("option_deprecated", change=deprecation, config_file=str(options.config_file))
    check_town_root(options.town_root)
    check_env_folder(options.env_file)
    check_socket_path(options.socket)
    check_shim_dir(options.shim_dir)
    clock = clock or SystemClock()
    systemd = SystemdNotifier()
    registry = MetricsRegistry()
    bus = EventBus(first_id=run_first_id(clock.time()))
    store = SettingsStore(
        town_root=options.town_root,
        emit=bus.publish,
        extra_presets=options.extra_presets,
        last_applied=LastApplied(state_dir=options.state_dir, town_id=options.town_id),
    )
    desired_client = DesiredConfigClient(
        base_url=options.cloud_url,
        internal_key=options.internal_key.reveal(),
        town_id=options.town_id,
        timeout=options.refresh_timeout,
    )
    config_sync = ConfigSync(
        store=store,
        source=desired_client,
        bearer=lambda: read_token(options.env_file),
        clock=clock,
        interval=options.config_sync_interval,
    )
    client = CloudClient(
        base_url=options.cloud_url,
        internal_key=options.internal_key.reveal(),
        town_id=options.town_id,
        timeout=options.refresh_timeout,
    )
    refresher = TokenRefresher(
        town_id=options.town_id,
        env_file=options.env_file,
        client=client,
        emit=bus.publish,
        clock=clock,
        policy=options.schedule,
        metrics=token_metrics(registry, on_state=systemd.report_state),
        on_cloud_recovered=config_sync.wake,
    )
    watcher = SettingsWatcher(
        town_root=options.town_root,
        env_file=options.env_file,
        folders=store.watched_folders,
        on_settings_change=store.reconcile_external,
        on_env_change=refresher.reload_env_file,
        debounce_ms=options.watch_debounce_ms,
        step_ms=options.watch_step_ms,
    )
    agents = AgentKeeper(
        shim_dir=options.shim_dir,
        names=options.agent_shims,
        env_file=options.env_file,
        socket=options.socket,
        claude_helper_ttl=options.claude_helper_ttl,
        town_id=options.town_id,
    )
    notifier = Notifier(
        bus=bus, hooks=options.hooks, signals=options.signals, shim_dir=options.shim_dir
    )
    metrics = DaemonMetrics(registry, bus=bus, notifier=notifier, watcher=watcher)
    lock = SocketLock(options.socket)
    lock.acquire()
    try:
        tcp = bind_tcp(options.listen)
        try:
            unix = bind_unix(options.socket)
        except OSError:
            tcp.close()
            raise
    except BaseException:
        lock.release()
        raise
    shutdown = anyio.Event()
    current = [options]

    def apply(new: Options) -> None:
        notifier.reconfigure(new.hooks, new.signals)
        refresher.set_policy(new.schedule)
        agents.update(names=new.agent_shims, claude_helper_ttl=new.claude_helper_ttl)
        agents.guarded_sync()  # a few small files: the shims match the new list at once
        config_sync.set_interval(new.config_sync_interval)
        current[0] = new

    local = LocalSocket(unix, lock)
    ctx = ApiContext(
        town_id=options.town_id,
        cloud_url=options.cloud_url,
        env_file=options.env_file,
        town_root=options.town_root,
        refresher=refresher,
        store=store,
        bus=bus,
        registry=registry,
        clock=clock,
        watcher_status=watcher.status,
        count_patch=metrics.count_patch,
        sse_clients=metrics.sse_clients,
        config_sync=config_sync,
        shim_dir=options.shim_dir,
        local_socket_status=local.status,
    )
    async with _owning(lock, local), client, desired_client, anyio.create_task_group() as tg:
        await tg.start(_stop_on_signal, shutdown, bus)
        await tg.start(_reload_on_signal, lambda: current[0], reload, apply, local.check_now)
        # Subscribed before anything emits: hooks and signals see the events of the start
        # (a token found expired, a refresh at once) as the SSE replay does.
        await tg.start(notifier.run)
        await store.load()
        await tg.start(store.run)
        await anyio.to_thread.run_sync(
            _remove_stale_temporaries, options.env_file, store.watched_folders()
        )
        await tg.start(refresher.run)
        await tg.start(agents.run)
        await tg.start(watcher.run)
        await tg.start(systemd.run_watchdog)
        async with anyio.create_task_group() as servers:
            log.info("api_listening", address=describe(tcp))
            servers.start_soon(
                serve_socket, create_app(ctx, key=options.internal_key.reveal()), tcp, shutdown
            )
            log.info("api_listening", address=describe(unix))
            await servers.start(local.run, create_app(ctx, key=None), shutdown)
            systemd.notify("READY=1", f"STATUS=serving; token {refresher.status().state}")
            log.info("daemon_ready", town_id=options.town_id, state=refresher.status().state)
            task_status.started()
            # Converge at start, once serving: the first sync waits for the cloud.
            await tg.start(config_sync.run)
        # The servers return once `shutdown` is set and their connections closed.
        tg.cancel_scope.cancel()
    log.info("daemon_stopped")


@contextlib.asynccontextmanager
async def _owning(lock: SocketLock, local: LocalSocket) -> AsyncIterator[None]:
    """At the end, remove the socket (if it is the one served), then drop the lock."""
    try:
        yield
    finally:
        local.remove()
        lock.release()


async def _stop_on_signal(
    shutdown: anyio.Event,
    bus: EventBus,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            log.info("daemon_stopping", signal=signal.Signals(signum).name)
            SystemdNotifier().notify("STOPPING=1")
            # Ending the event streams lets hypercorn close SSE connections at once.
            bus.close()
            shutdown.set()
            return


async def _reload_on_signal(
    current: Callable[[], Options],
    reload: Callable[[], Options] | None,
    apply: Callable[[Options], None],
    check_socket: Callable[[], None],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """On each SIGHUP, read the options again and apply what can change in place, and look
    at the local socket's path at once (`LocalSocket.check_now`).

    The handler is installed explicitly, so SIGHUP reloads even when the daemon was started
    with it ignored (`nohup`): its default action would otherwise end the daemon.
    """
    with anyio.open_signal_receiver(RELOAD_SIGNAL) as signals:
        task_status.started()
        async for _ in signals:
            check_socket()
            await reload_options(current(), reload, apply)


async def reload_options(
    old: Options, reload: Callable[[], Options] | None, apply: Callable[[Options], None]
) -> bool:
    """Read the options with `reload` and `apply` them; a bad file is logged and refused."""
    if reload is None:
        log.warning("options_reload_unavailable")
        return False
    try:
        new = await anyio.to_thread.run_sync(reload)
    except OptionsError as exc:
        # The old options stay: one bad edit must not take hooks away from a running daemon.
        log.error(
            "options_reload_refused",
            config_file=str(old.config_file),
            problems=str(exc).splitlines(),
        )
        return False
    except Exception as exc:
        # Whatever else reading a file can raise: the same, never the end of the daemon.
        log.error(
            "options_reload_refused",
            config_file=str(old.config_file),
            problems=[f"{type(exc).__name__}: {exc}"],
        )
        return False
    restart = sorted(
        field.name
        for field in dataclasses.fields(Options)
        if field.name not in RELOADABLE and getattr(new, field.name) != getattr(old, field.name)
    )
    # What runs from now: the reloadable options of the file, every other as the daemon
    # started. Taken whole, a change that needs a restart was named once, then no more
    # though still needed, and named again once the file was put back.
    apply(dataclasses.replace(old, **{name: getattr(new, name) for name in RELOADABLE}))
    changed = sorted(name for name in RELOADABLE if getattr(new, name) != getattr(old, name))
    log.info(
        "options_reloaded",
        config_file=str(new.config_file),
        changed=changed,
        hooks=[list(hook.command) for hook in new.hooks],
        signals=len(new.signals),
    )
    if restart:
        log.warning("options_need_restart", options=restart)
    return True


def _remove_stale_temporaries(env_file: Path, folders: list[Path]) -> None:
    """Temporary files of writes a SIGKILL interrupted (they may hold a token: 0600)."""
    remove_stale_temporaries(env_file)
    for folder in folders:
        remove_stale_temporaries(folder / CONFIG)
