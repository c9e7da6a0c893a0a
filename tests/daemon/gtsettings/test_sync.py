"""The desired-state sync component: converge, report, retry, schedule (simulated clock)."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from gastown_sandboxd.errors import DesiredConfigUnavailable, RefreshError
from gastown_sandboxd.events.types import DomainEvent
from gastown_sandboxd.gtsettings.desired import DesiredConfig
from gastown_sandboxd.gtsettings.last_applied import FILE_NAME, LastApplied
from gastown_sandboxd.gtsettings.store import SettingsStore
from gastown_sandboxd.gtsettings.sync import ConfigSync, SyncResult, SyncState
from gastown_sandboxd.token.refresher import TokenRefresher
from tests.daemon.gt_samples import build_town
from tests.daemon.minting import mint
from tests.daemon.simclock import SimulatedClock
from tests.waiting import eventually

TOWN_FILE = "settings/config.json"
DESIRED = {
    "town": {"default_agent": "codex", "role_effort": {"mayor": "high"}},
    "rigs": {"docs": {"agent": "codex"}},
}


class FakeCloud:
    """The cloud's two config routes as the sync sees them, recording every call."""

    def __init__(self) -> None:
        self.generation = 1
        self.desired: dict[str, Any] = copy.deepcopy(DESIRED)
        self.observed: int | None = 0
        self.state = "pending"
        self.fetches = 0
        self.reports: list[dict[str, Any]] = []
        self.bearers: list[str | None] = []
        self.fail: DesiredConfigUnavailable | None = None
        self.fail_report: DesiredConfigUnavailable | None = None
        self.fetched = anyio.Event()

    def change(self, desired: dict[str, Any]) -> None:
        self.desired = desired
        self.generation += 1
        self.state = "pending"

    async def fetch(self, bearer: str | None) -> DesiredConfig:
        self.fetches += 1
        self.bearers.append(bearer)
        self.fetched.set()
        self.fetched = anyio.Event()
        if self.fail is not None:
            raise self.fail
        return DesiredConfig(
            self.generation, copy.deepcopy(self.desired), self.observed, self.state
        )

    async def report(
        self,
        bearer: str | None,
        *,
        observed_generation: int,
        revision: str,
        error: dict[str, Any] | None,
    ) -> None:
        if self.fail_report is not None:
            raise self.fail_report
        self.reports.append(
            {"observedGeneration": observed_generation, "revision": revision, "error": error}
        )
        self.observed = observed_generation
        self.state = "failed" if error else "applied"


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: DomainEvent, /) -> None:
        self.seen.append((event.TYPE, event.fields()))


class RecordingClock(SimulatedClock):
    """A simulated clock that also keeps every sleep asked of it."""

    def __init__(self) -> None:
        super().__init__(autojump=False)
        self.asked: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        await super().sleep(seconds)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_town(tmp_path / "town", rigs=("docs", "web"))


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
async def store(root: Path, tmp_path: Path, events: Events) -> SettingsStore:
    last = LastApplied(state_dir=tmp_path / "state", town_id="town-1")
    settings_store = SettingsStore(town_root=root, emit=events, last_applied=last)
    await settings_store.load()
    return settings_store


def make_sync(store: SettingsStore, cloud: FakeCloud, **kwargs: Any) -> ConfigSync:
    return ConfigSync(store=store, source=cloud, bearer=lambda: "the-token", **kwargs)


def doc(root: Path, rig: str | None = None) -> dict[str, Any]:
    path = root / TOWN_FILE if rig is None else root / rig / TOWN_FILE
    result: dict[str, Any] = json.loads(path.read_bytes())
    return result


def stats(root: Path) -> list[tuple[str, int, int]]:
    return [
        (str(p), p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(root.glob("**/settings/config.json"))
    ]


async def test_a_sync_applies_desired_reports_it_and_keeps_the_last_applied_copy(
    root: Path, store: SettingsStore, events: Events, tmp_path: Path
) -> None:
    """Files take the desired keys, others stay; events say cloud and generation; the cloud
    hears the generation and the revision; the copy is in the state folder (0600)."""
    cloud = FakeCloud()
    comment = doc(root)["_comment"]
    result = await make_sync(store, cloud).sync_now()
    assert result.state is SyncState.APPLIED
    assert result.changed
    assert sorted(result.files) == ["docs/settings/config.json", TOWN_FILE]
    assert doc(root)["default_agent"] == "codex"
    assert doc(root)["role_effort"]["mayor"] == "high"
    assert doc(root)["_comment"] == comment
    assert doc(root, "docs")["agent"] == "codex"
    assert {(t, f["source"], f["generation"]) for t, f in events.seen} == {
        ("config.changed", "cloud", 1)
    }
    assert cloud.reports == [{"observedGeneration": 1, "revision": store.revision, "error": None}]
    assert cloud.bearers == ["the-token"]
    kept = tmp_path / "state" / FILE_NAME
    assert json.loads(kept.read_bytes())["desired"] == DESIRED
    assert kept.stat().st_mode & 0o777 == 0o600


async def test_a_report_the_cloud_did_not_take_is_sent_again_by_the_next_sync(
    root: Path, store: SettingsStore
) -> None:
    """The files are applied and the copy kept; the cloud still shows the generation
    pending, so the next sync, with nothing left to write, reports it."""
    cloud = FakeCloud()
    cloud.fail_report = DesiredConfigUnavailable(503, "unreachable", "the cloud is away")
    sync = make_sync(store, cloud)
    with capture_logs() as logs:
        first = await sync.sync_now()
    assert (first.state, first.changed, first.reported) == (SyncState.APPLIED, True, False)
    assert doc(root)["default_agent"] == "codex"
    assert store.last_applied.applied.generation == 1
    assert [(e["event"], e["reason"]) for e in logs if e["log_level"] == "warning"] == [
        ("config_sync_report_failed", "unreachable")
    ]
    assert (cloud.reports, cloud.state) == ([], "pending")
    cloud.fail_report = None
    before = stats(root)
    second = await sync.sync_now()
    assert (second.changed, second.reported) == (False, True)
    assert stats(root) == before
    assert cloud.reports == [{"observedGeneration": 1, "revision": store.revision, "error": None}]


async def test_an_env_file_that_cannot_be_read_syncs_without_a_bearer(
    root: Path, store: SettingsStore
) -> None:
    """The cloud decides what a call without the town's token gets; the sync still runs."""

    def unreadable() -> str | None:
        raise PermissionError(13, "Permission denied")

    cloud = FakeCloud()
    sync = ConfigSync(store=store, source=cloud, bearer=unreadable)
    with capture_logs() as logs:
        result = await sync.sync_now()
    assert result.state is SyncState.APPLIED
    assert cloud.bearers == [None]
    assert ("config_sync_token_unreadable", "Permission denied") in [
        (e["event"], e.get("error")) for e in logs
    ]


async def test_a_sync_with_nothing_to_do_writes_nothing_emits_nothing_reports_nothing(
    root: Path, store: SettingsStore, events: Events, tmp_path: Path
) -> None:
    """The second sync of the same generation: files, events, state file and cloud unchanged."""
    cloud = FakeCloud()
    sync = make_sync(store, cloud)
    await sync.sync_now()
    before = stats(root)
    kept = (tmp_path / "state" / FILE_NAME).stat()
    seen = len(events.seen)
    result = await sync.sync_now()
    assert not result.changed
    assert result.state is SyncState.APPLIED
    assert stats(root) == before
    assert len(events.seen) == seen
    assert len(cloud.reports) == 1
    after = (tmp_path / "state" / FILE_NAME).stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)


async def test_a_hand_edit_of_a_cloud_key_is_put_back_and_a_hand_added_key_kept(
    root: Path, store: SettingsStore
) -> None:
    """Drift from the applied generation is applied again, with the same generation."""
    cloud = FakeCloud()
    sync = make_sync(store, cloud)
    await sync.sync_now()
    edited = doc(root)
    edited["default_agent"] = "claude"
    edited["role_effort"]["crew"] = "low"
    (root / TOWN_FILE).write_text(json.dumps(edited, indent=2))
    result = await sync.sync_now()
    assert result.changed
    assert result.files == [TOWN_FILE]
    assert doc(root)["default_agent"] == "codex"
    assert doc(root)["role_effort"]["mayor"] == "high"
    assert doc(root)["role_effort"]["crew"] == "low"


async def test_a_key_the_cloud_drops_is_removed_at_the_next_generation(
    root: Path, store: SettingsStore
) -> None:
    """Only what the last-applied copy had and desired no longer has goes."""
    cloud = FakeCloud()
    sync = make_sync(store, cloud)
    await sync.sync_now()
    cloud.change({"town": {"default_agent": "codex"}, "rigs": {}})
    result = await sync.sync_now()
    assert result.generation == 2
    assert "role_effort" not in doc(root) or "mayor" not in doc(root)["role_effort"]
    assert "agent" not in doc(root, "docs")
    assert doc(root)["default_agent"] == "codex"


async def test_a_restart_keeps_which_keys_were_the_clouds(
    root: Path, tmp_path: Path, events: Events
) -> None:
    """A key the cloud dropped while the daemon was away is removed by the next run, which
    knows from the copy the last run kept that the key was the cloud's. The same files with
    the copy lost (a new state folder) keep it: the merge removes only what it knows."""

    async def run(town: Path, state: Path) -> SettingsStore:
        last = LastApplied(state_dir=state, town_id="town-1")
        store = SettingsStore(town_root=town, emit=events, last_applied=last)
        await store.load()
        return store

    cloud = FakeCloud()
    await make_sync(await run(root, tmp_path / "state"), cloud).sync_now()
    assert doc(root, "docs")["agent"] == "codex"
    lost = tmp_path / "copy" / "town"
    shutil.copytree(root, lost)
    cloud.change({"town": {"default_agent": "codex"}, "rigs": {}})
    for town, state in ((root, tmp_path / "state"), (lost, tmp_path / "new-state")):
        result = await make_sync(await run(town, state), cloud).sync_now()
        assert (result.state, result.generation) == (SyncState.APPLIED, 2)
    assert "agent" not in doc(root, "docs")
    assert "mayor" not in doc(root).get("role_effort", {})
    assert doc(lost, "docs")["agent"] == "codex"
    assert doc(lost)["role_effort"]["mayor"] == "high"


async def test_a_desired_configuration_the_checks_refuse_writes_nothing_and_is_reported(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """A rig that does not exist yet: failed, the cloud hears the details; once the folder
    exists the next sync applies it."""
    cloud = FakeCloud()
    cloud.desired = {"town": {"default_agent": "codex"}, "rigs": {"later": {"agent": "codex"}}}
    sync = make_sync(store, cloud)
    before = stats(root)
    result = await sync.sync_now()
    assert result.state is SyncState.FAILED
    assert stats(root) == before
    assert events.seen == []
    assert result.error is not None
    assert [d["path"] for d in result.error["details"]] == ["/rigs/later"]
    assert cloud.reports[-1]["error"] == result.error
    assert sync.status()["state"] == "failed"
    assert store.last_applied.applied.generation is None
    (root / "later").mkdir()
    result = await sync.sync_now()
    assert result.state is SyncState.APPLIED
    assert doc(root, "later")["agent"] == "codex"
    assert cloud.reports[-1]["error"] is None


async def test_a_desired_value_that_is_not_unicode_is_reported_failed_and_writes_nothing(
    root: Path, store: SettingsStore
) -> None:
    """The cloud's answer decodes to a lone surrogate: refused like a PATCH with one (no file
    could hold it as UTF-8), and the report the cloud gets says where, writable as JSON."""
    cloud = FakeCloud()
    cloud.desired = json.loads('{"town": {"default_agent": "co\\ud800dex"}, "rigs": {}}')
    before = stats(root)
    result = await make_sync(store, cloud).sync_now()
    assert result.state is SyncState.FAILED
    assert stats(root) == before
    assert result.error is not None
    said = {(d["path"], d["message"].split(":")[0]) for d in result.error["details"]}
    assert ("/town/default_agent", "is not Unicode") in said
    (report,) = cloud.reports
    assert report["error"] == result.error
    assert json.dumps(report, ensure_ascii=False).encode("utf-8")  # as httpx would send it


async def test_an_unreachable_cloud_writes_nothing_and_retries_sooner(
    root: Path, store: SettingsStore
) -> None:
    """The read fails: the error goes up (for a 502/503/504), state unreachable, no write."""
    cloud = FakeCloud()
    cloud.fail = DesiredConfigUnavailable(503, "connect_error", "the cloud cannot be reached")
    sync = make_sync(store, cloud, rng=random.Random(1))
    before = stats(root)
    with pytest.raises(DesiredConfigUnavailable):
        await sync.sync_now()
    assert stats(root) == before
    assert sync.status()["state"] == "unreachable"
    assert 4.5 <= sync.next_delay() <= 5.5
    with pytest.raises(DesiredConfigUnavailable):
        await sync.sync_now()
    assert 9 <= sync.next_delay() <= 11


async def test_a_push_with_a_generation_is_not_redone_by_the_next_sync(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """PATCH /config with X-Gastown-Generation records the change as applied."""
    cloud = FakeCloud()
    sync = make_sync(store, cloud)
    await sync.sync_now()
    patch = {"town": {"role_effort": {"crew": "max"}}}
    cloud.change(
        {
            "town": {"default_agent": "codex", "role_effort": {"mayor": "high", "crew": "max"}},
            "rigs": {"docs": {"agent": "codex"}},
        }
    )
    await store.patch(patch, generation=cloud.generation)
    assert store.last_applied.applied.generation == 2
    assert events.seen[-1][1]["generation"] == 2
    before = stats(root)
    cloud.observed, cloud.state = 2, "applied"
    result = await sync.sync_now()
    assert not result.changed
    assert stats(root) == before
    assert len(cloud.reports) == 1


async def test_the_copy_of_another_town_is_not_used(root: Path, tmp_path: Path) -> None:
    """A state folder of another town counts as none: nothing the cloud set is known."""
    state = tmp_path / "state"
    state.mkdir()
    (state / FILE_NAME).write_text(json.dumps({"town_id": "other", "generation": 3, "desired": {}}))
    last = LastApplied(state_dir=state, town_id="town-1")
    assert last.load().generation is None


async def test_the_loop_syncs_at_start_every_interval_jittered_and_when_woken(
    store: SettingsStore,
) -> None:
    """Start, then a sleep of 270..330 s for a 300 s interval; `wake` cuts it short."""
    cloud = FakeCloud()
    clock = RecordingClock()
    sync = make_sync(store, cloud, clock=clock, interval=300.0)
    async with anyio.create_task_group() as tg:
        await tg.start(sync.run)
        with anyio.fail_after(10):
            while not clock.asked:
                await anyio.sleep(0.01)
        assert cloud.fetches == 1
        assert 270 <= clock.asked[0] <= 330
        clock.advance(clock.asked[0])
        with anyio.fail_after(10):
            while cloud.fetches < 2 or len(clock.asked) < 2:
                await anyio.sleep(0.01)
        sync.wake()
        with anyio.fail_after(10):
            while cloud.fetches < 3:
                await anyio.sleep(0.01)
        assert clock.monotonic == clock.asked[0]  # the wake did not wait for the clock
        tg.cancel_scope.cancel()
    status = sync.status()
    assert status["generation"] == 1
    assert status["state"] == "applied"
    assert status["last_sync_at"] == clock.time()


async def test_a_sync_that_crashes_is_logged_and_the_loop_goes_on(
    root: Path, store: SettingsStore
) -> None:
    """A bug in one sync (here the cloud's answer raises what no sync expects) is logged
    with its traceback; the loop sleeps and syncs again, and that sync applies."""
    cloud = FakeCloud()
    real_fetch = cloud.fetch

    async def fetch(bearer: str | None) -> DesiredConfig:
        if cloud.fetches == 0:
            cloud.fetches += 1
            raise RuntimeError("a bug")
        return await real_fetch(bearer)

    cloud.fetch = fetch  # type: ignore[method-assign]
    clock = RecordingClock()
    sync = make_sync(store, cloud, clock=clock, interval=300.0)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(sync.run)
            with anyio.fail_after(10):
                while not clock.asked:
                    await anyio.sleep(0.01)
            clock.advance(clock.asked[0])
            with anyio.fail_after(10):
                while sync.status()["state"] != "applied":
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    crashes = [e for e in logs if e["event"] == "config_sync_crashed"]
    assert len(crashes) == 1
    assert crashes[0]["exc_info"] is True
    assert doc(root)["default_agent"] == "codex"


async def test_a_new_interval_replans_the_nap_without_a_sync(store: SettingsStore) -> None:
    """`set_interval` (SIGHUP) ends the nap in progress and plans a new one of the new
    interval, jittered, without syncing at once; the same interval changes nothing."""
    cloud = FakeCloud()
    clock = RecordingClock()
    sync = make_sync(store, cloud, clock=clock, interval=300.0)
    async with anyio.create_task_group() as tg:
        await tg.start(sync.run)
        await eventually(lambda: clock.asked)
        assert 270 <= clock.asked[0] <= 330
        sync.set_interval(300.0)
        sync.set_interval(60.0)
        assert sync.interval == 60.0
        await eventually(lambda: len(clock.asked) >= 2)
        assert 54 <= clock.asked[1] <= 66
        assert cloud.fetches == 1  # planned again, not synced
        clock.advance(clock.asked[1])
        await eventually(lambda: cloud.fetches == 2 and len(clock.asked) >= 3)
        assert 54 <= clock.asked[2] <= 66
        tg.cancel_scope.cancel()


async def test_the_refresher_calls_back_on_its_first_success_after_failures(
    tmp_path: Path,
) -> None:
    """The token component tells of an outage's end through a callback, once."""
    clock = SimulatedClock()
    calls: list[str] = []
    answers: list[str | Exception] = [RefreshError("outage", "connect_error")]

    class Source:
        async def refresh(self, current_token: str | None) -> str:
            answer = answers.pop(0) if answers else mint(clock.time(), town_id="town-1")
            if isinstance(answer, Exception):
                raise answer
            return answer

    refresher = TokenRefresher(
        town_id="town-1",
        env_file=tmp_path / "env",
        client=Source(),
        emit=lambda *args: None,
        clock=clock,
        on_cloud_recovered=lambda: calls.append("recovered"),
    )
    with pytest.raises(RefreshError):
        await refresher.refresh_now()
    assert calls == []
    await refresher.refresh_now()
    await refresher.refresh_now()
    assert calls == ["recovered"]


async def test_a_sync_asked_for_while_one_reads_the_cloud_gets_the_next_read(
    store: SettingsStore,
) -> None:
    """A POST /config/sync that comes while a sync is reading the cloud waits for it and gets
    a sync that reads the cloud again: a dashboard change made meanwhile is in its answer."""
    cloud = FakeCloud()
    gate = anyio.Event()
    fetch = cloud.fetch

    async def slow_fetch(bearer: str | None) -> DesiredConfig:
        answer = await fetch(bearer)  # what the cloud held when the read began
        await gate.wait()
        return answer

    cloud.fetch = slow_fetch  # type: ignore[method-assign]
    sync = make_sync(store, cloud)
    results: dict[str, SyncResult] = {}

    async def one(name: str) -> None:
        results[name] = await sync.sync_now()

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "start-up")
        await anyio.wait_all_tasks_blocked()  # the start-up sync is reading the cloud
        cloud.change({"town": {"default_agent": "claude"}})
        tg.start_soon(one, "asked")
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert cloud.fetches == 2
    assert results["start-up"].generation == 1
    assert results["asked"].generation == 2
    assert store.last_applied.applied.generation == 2


async def test_a_sync_that_waited_for_a_failed_read_gets_its_error_without_a_second_read(
    store: SettingsStore,
) -> None:
    """An unreachable cloud is reported within one timeout, even to a call that had to wait."""
    cloud = FakeCloud()
    cloud.fail = DesiredConfigUnavailable(504, "timeout", "the cloud did not answer")
    gate = anyio.Event()
    fetch = cloud.fetch

    async def slow_fetch(bearer: str | None) -> DesiredConfig:
        await gate.wait()
        return await fetch(bearer)

    cloud.fetch = slow_fetch  # type: ignore[method-assign]
    sync = make_sync(store, cloud)
    errors: list[DesiredConfigUnavailable] = []

    async def one() -> None:
        with pytest.raises(DesiredConfigUnavailable) as caught:
            await sync.sync_now()
        errors.append(caught.value)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert cloud.fetches == 1
    assert [error.status for error in errors] == [504, 504]


async def test_a_cloud_unreadable_for_days_never_overflows_the_retry_delay(
    store: SettingsStore,
) -> None:
    """1,025 failures (~85 h of an unreadable cloud) made 2 ** 1024 overflow a float, and
    the sync loop, and with it the daemon, ended. The delay stays the interval."""
    sync = make_sync(store, FakeCloud(), rng=random.Random(1))
    for failures in (1_025, 100_000):
        sync._failures = failures
        assert 0.9 * sync._interval <= sync.next_delay() <= 1.1 * sync._interval


async def test_a_desired_configuration_too_deep_to_merge_is_reported_failed(
    root: Path, store: SettingsStore
) -> None:
    """~500 levels (json reads ~990, the merge walks half that): reported failed like a
    refused PATCH, nothing written (before, RecursionError crashed every sync, unreported)."""
    deep: dict[str, Any] = {}
    for _ in range(600):
        deep = {"k": deep}
    desired = {"town": {"agents": {"x": {"provider": "claude", "extra": deep}}}}

    class DeepCloud(FakeCloud):
        async def fetch(self, bearer: str | None) -> DesiredConfig:
            return DesiredConfig(self.generation, desired, self.observed, self.state)

    cloud = DeepCloud()
    before = stats(root)
    result = await make_sync(store, cloud).sync_now()
    assert result.state is SyncState.FAILED
    assert stats(root) == before
    assert cloud.reports[-1]["error"]["message"] == (
        "the desired configuration is nested too deeply to merge"
    )


async def test_a_copy_that_could_not_be_saved_is_saved_at_the_next_sync(
    root: Path, tmp_path: Path, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that failed once (a full disk) is made again by the next sync of the same
    copy: before, the copy on disk stayed the older one for good, and after a restart the sync
    removed a key a person had added by hand that the cloud had set and then dropped."""
    import gastown_sandboxd.gtsettings.last_applied as last_applied_module

    state = tmp_path / "state"
    store = SettingsStore(
        town_root=root, emit=events, last_applied=LastApplied(state_dir=state, town_id="town-1")
    )
    await store.load()
    cloud = FakeCloud()
    cloud.desired = {"town": {"role_effort": {"mayor": "high"}}}
    await make_sync(store, cloud).sync_now()
    cloud.change({"town": {}})  # generation 2 drops the key
    real_write = last_applied_module.write_atomic  # type: ignore[attr-defined]
    full = [True]

    def write_atomic(*args: Any, **kwargs: Any) -> object:
        if full[0]:
            raise OSError(28, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(last_applied_module, "write_atomic", write_atomic)
    sync = make_sync(store, cloud)
    await sync.sync_now()
    full[0] = False
    await sync.sync_now()  # the same copy: saved now
    saved = json.loads((state / last_applied_module.FILE_NAME).read_text())
    assert (saved["generation"], saved["desired"]) == (2, {"town": {}})


async def test_a_state_folder_that_cannot_be_written_does_not_stop_the_sync(
    root: Path, tmp_path: Path, events: Events
) -> None:
    """The files are applied and the copy kept in memory; the failure is logged."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder should be")
    last = LastApplied(state_dir=blocker / "state", town_id="town-1")
    store = SettingsStore(town_root=root, emit=events, last_applied=last)
    await store.load()
    with capture_logs() as logs:
        result = await make_sync(store, FakeCloud()).sync_now()
    assert result.state is SyncState.APPLIED
    assert doc(root)["default_agent"] == "codex"
    assert store.last_applied.applied.generation == 1
    assert "last_applied_not_saved" in [log["event"] for log in logs]


async def test_a_read_overtaken_by_a_push_does_not_undo_the_push(
    root: Path, store: SettingsStore
) -> None:
    """The sync read generation 0; a push of generation 1 lands before it applies: the
    push's keys stay, nothing is reported for the stale read."""
    cloud = FakeCloud()
    cloud.generation, cloud.desired = 0, {}
    gate = anyio.Event()
    fetch = cloud.fetch

    async def slow_fetch(bearer: str | None) -> DesiredConfig:
        answer = await fetch(bearer)
        await gate.wait()
        return answer

    cloud.fetch = slow_fetch  # type: ignore[method-assign]
    sync = make_sync(store, cloud)
    results = []

    async def run_sync() -> None:
        results.append(await sync.sync_now())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_sync)
        await anyio.wait_all_tasks_blocked()
        await store.patch({"town": {"default_agent": "codex"}}, generation=1)
        gate.set()
    assert doc(root)["default_agent"] == "codex"
    assert (results[0].generation, results[0].changed) == (1, False)
    assert cloud.reports == []


async def test_a_cloud_that_went_back_a_generation_is_converged_on_and_told(
    root: Path, store: SettingsStore
) -> None:
    """The copy holds generation 2 from a push the cloud never kept (killed before it saved
    it, its database restored), and the cloud serves generation 1. With no push since the
    read, that is the cloud going back, not a stale read: its configuration is applied, the
    copy goes back with it, and the cloud is told (before, every sync skipped it as stale,
    reported nothing, and the sandbox never converged again)."""
    await store.patch({"town": {"default_agent": "claude"}}, generation=2)
    cloud = FakeCloud()
    cloud.desired = {"town": {"default_agent": "codex"}}
    result = await make_sync(store, cloud).sync_now()
    assert (result.state, result.generation, result.changed) == (SyncState.APPLIED, 1, True)
    assert doc(root)["default_agent"] == "codex"
    assert store.last_applied.applied.generation == 1
    assert [report["observedGeneration"] for report in cloud.reports] == [1]
