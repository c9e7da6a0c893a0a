"""The settings watcher under the kernel's own inotify limits, in a user namespace of its own
(the limits are the namespace's: nothing outside it is touched)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# A watcher in a process whose user namespace has no inotify watch to spare (ENOSPC on every
# inotify_add_watch, as when other programs hold the user's watches): its town root removed
# while it polls by stat, then made again with an edit. Prints what it saw as JSON.
WATCH_WITHOUT_WATCHES = """
import json, shutil, sys
from pathlib import Path
import anyio
from structlog.testing import capture_logs
from gastown_sandboxd.watcher import SettingsWatcher

async def main(root: Path, env_file: Path) -> None:
    seen = set()
    async def on_settings(paths):
        seen.update(str(path) for path in paths)
    async def on_env():
        pass
    watcher = SettingsWatcher(
        town_root=root, env_file=env_file, folders=lambda: [root / "settings"],
        on_settings_change=on_settings, on_env_change=on_env,
        poll_step_ms=10, retry_delay=0.05, inotify_retry_s=0.05,
    )
    with capture_logs() as logs, anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(watcher.run)
            while watcher.status()["mode"] != "stat":  # the first watch failed
                await anyio.sleep(0.01)
            shutil.rmtree(root)
            asked = watcher.status()["errors"]
            while watcher.status()["errors"] < asked + 3:  # inotify asked 3 times more
                await anyio.sleep(0.01)
            mode = watcher.status()["mode"]
            (root / "settings").mkdir(parents=True)
            (root / "settings" / "config.json").write_text("{}")
            while str(root / "settings" / "config.json") not in seen:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    print(json.dumps({"mode": mode, "events": [log["event"] for log in logs]}))

anyio.run(main, Path(sys.argv[1]), Path(sys.argv[2]))
"""

WITHOUT_WATCHES = (
    *("unshare", "--user", "--map-root-user", "sh", "-c"),
    *('echo 0 > /proc/sys/user/max_inotify_watches && exec "$@"', "sh"),
)


def test_with_the_watches_used_up_a_town_root_made_again_is_still_polled_by_stat(
    tmp_path: Path,
) -> None:
    """With no inotify watch to be had, the watcher polls by stat. While the town root is
    gone, each ask of inotify is still told apart from a fault (the kernel is asked with a
    folder that is always there: a watch of the missing root fails with ENOENT first), so
    the watcher goes on polling, logs no failure, and sees the file of the root made again."""
    probe = subprocess.run([*WITHOUT_WATCHES, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no user namespace with its own inotify limits here: {probe.stderr!r}")
    root = tmp_path / "gt"
    (root / "settings").mkdir(parents=True)
    env_file = tmp_path / ".env.gateway"
    env_file.write_text("KILO_JWT=a\n")
    done = subprocess.run(
        [*WITHOUT_WATCHES, sys.executable, "-c", WATCH_WITHOUT_WATCHES, str(root), str(env_file)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout)
    assert seen["mode"] == "stat"
    assert seen["events"].count("watcher_inotify_used_up") == 1
    assert "watcher_failed" not in seen["events"]


# A watcher whose user has one inotify instance, which its doorbell takes: watchfiles' collect
# cannot have the second it needs. Three edits of the town file, one after another; prints
# how many were seen and what was logged.
WATCH_WITH_ONE_INSTANCE = """
import json, sys
from pathlib import Path
import anyio
from structlog.testing import capture_logs
from gastown_sandboxd.watcher import SettingsWatcher

async def main(root: Path, env_file: Path) -> None:
    town_file = root / "settings" / "config.json"
    seen = []
    async def on_settings(paths):
        seen.extend(str(path) for path in paths if path == town_file)
    async def on_env():
        pass
    watcher = SettingsWatcher(
        town_root=root, env_file=env_file, folders=lambda: [root / "settings"],
        on_settings_change=on_settings, on_env_change=on_env,
        poll_step_ms=10, retry_delay=0.05, inotify_retry_s=30,
    )
    with capture_logs() as logs, anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(watcher.run)
            for n in range(3):
                before = len(seen)
                town_file.write_text(json.dumps({"n": n}))
                while len(seen) == before:
                    await anyio.sleep(0.01)
            mode = watcher.status()["mode"]
            tg.cancel_scope.cancel()
    print(json.dumps({"mode": mode, "events": [log["event"] for log in logs]}))

anyio.run(main, Path(sys.argv[1]), Path(sys.argv[2]))
"""

ONE_INSTANCE = (
    *("unshare", "--user", "--map-root-user", "sh", "-c"),
    *('echo 1 > /proc/sys/user/max_inotify_instances && exec "$@"', "sh"),
)


def test_with_one_inotify_instance_left_the_watcher_polls_by_stat_and_sees_each_edit(
    tmp_path: Path,
) -> None:
    """With inotify only partly used up (one instance: the doorbell's), the failure itself
    says so and the watcher polls by stat: each of three edits is seen. Before, the probe of
    the kernel came after the failed watch had given its instance back, found one free,
    and the watcher retried for ever with a `watcher_failed` per edit and no edit seen."""
    probe = subprocess.run([*ONE_INSTANCE, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no user namespace with its own inotify limits here: {probe.stderr!r}")
    root = tmp_path / "gt"
    (root / "settings").mkdir(parents=True)
    (root / "settings" / "config.json").write_text("{}")
    env_file = tmp_path / ".env.gateway"
    env_file.write_text("KILO_JWT=a\n")
    done = subprocess.run(
        [*ONE_INSTANCE, sys.executable, "-c", WATCH_WITH_ONE_INSTANCE, str(root), str(env_file)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout)
    assert seen["mode"] == "stat"
    assert seen["events"].count("watcher_inotify_used_up") == 1
    assert "watcher_failed" not in seen["events"]
