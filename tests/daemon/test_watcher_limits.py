"""The settings watcher under the kernel's own inotify limits, in a user namespace of its own
(the limits are the namespace's: nothing outside it is touched)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# What each script below starts with: a watcher of `root`'s settings folder, whose calls are
# gathered in `seen`, and the main of the script, run with ROOT and ENV_FILE; the script
# prints {"mode", "events"} as JSON: the watcher's mode at the end and the events it logged.
WATCHER = """
import json, shutil, sys
from pathlib import Path
import anyio
from structlog.testing import capture_logs
from gastown_sandboxd.watcher import SettingsWatcher

def watcher_of(root, env_file, seen, inotify_retry_s):
    async def on_settings(paths):
        seen.extend(str(path) for path in paths)
    async def on_env():
        pass
    return SettingsWatcher(
        town_root=root, env_file=env_file, folders=lambda: [root / "settings"],
        on_settings_change=on_settings, on_env_change=on_env,
        poll_step_ms=10, retry_delay=0.05, inotify_retry_s=inotify_retry_s,
    )

async def run(main):
    with capture_logs() as logs, anyio.fail_after(30):
        mode = await main(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps({"mode": mode, "events": [log["event"] for log in logs]}))
"""

# No inotify watch to spare (ENOSPC on every inotify_add_watch, as when other programs hold
# the user's watches): the town root removed while the watcher polls by stat, then made
# again with an edit.
ROOT_MADE_AGAIN = """
async def main(root, env_file):
    seen = []
    watcher = watcher_of(root, env_file, seen, inotify_retry_s=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        while watcher.status()["mode"] != "stat":  # the first watch failed
            await anyio.sleep(0.01)
        shutil.rmtree(root)
        seen.clear()  # the town file of before, read again as the watcher began to poll
        asked = watcher.status()["errors"]
        while watcher.status()["errors"] < asked + 3:  # inotify asked 3 times more
            await anyio.sleep(0.01)
        mode = watcher.status()["mode"]
        (root / "settings").mkdir(parents=True)
        (root / "settings" / "config.json").write_text("{}")
        while str(root / "settings" / "config.json") not in seen:
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    return mode

anyio.run(run, main)
"""

# One inotify instance for the user, which the doorbell takes: watchfiles' collect cannot
# have the second it needs. Three edits of the town file, each awaited.
THREE_EDITS = """
async def main(root, env_file):
    town_file = root / "settings" / "config.json"
    seen = []
    watcher = watcher_of(root, env_file, seen, inotify_retry_s=30)
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        for n in range(3):
            before = seen.count(str(town_file))
            town_file.write_text(json.dumps({"n": n}))
            while seen.count(str(town_file)) == before:
                await anyio.sleep(0.01)
        mode = watcher.status()["mode"]
        tg.cancel_scope.cancel()
    return mode

anyio.run(run, main)
"""


def _watched_with(limit: str, value: int, script: str, tmp_path: Path) -> dict[str, Any]:
    """`script` run in a user namespace whose inotify `limit` is `value`, on a town root with
    a town file; what it printed. Skipped where no such namespace can be made."""
    limited = (
        *("unshare", "--user", "--map-root-user", "sh", "-c"),
        *(f'echo {value} > /proc/sys/user/{limit} && exec "$@"', "sh"),
    )
    probe = subprocess.run([*limited, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no user namespace with its own inotify limits here: {probe.stderr!r}")
    root = tmp_path / "gt"
    (root / "settings").mkdir(parents=True)
    (root / "settings" / "config.json").write_text("{}")
    env_file = tmp_path / ".env.gateway"
    env_file.write_text("KILO_JWT=a\n")
    done = subprocess.run(
        [*limited, sys.executable, "-c", WATCHER + script, str(root), str(env_file)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen: dict[str, Any] = json.loads(done.stdout)
    return seen


def test_with_the_watches_used_up_a_town_root_made_again_is_still_polled_by_stat(
    tmp_path: Path,
) -> None:
    """With no inotify watch to be had, the watcher polls by stat. While the town root is
    gone, each ask of inotify is still told apart from a fault (the kernel is asked with a
    folder that is always there: a watch of the missing root fails with ENOENT first), so
    the watcher goes on polling, logs no failure, and sees the file of the root made again."""
    seen = _watched_with("max_inotify_watches", 0, ROOT_MADE_AGAIN, tmp_path)
    assert seen["mode"] == "stat"
    assert seen["events"].count("watcher_inotify_used_up") == 1
    assert "watcher_failed" not in seen["events"]


def test_with_one_inotify_instance_left_the_watcher_polls_by_stat_and_sees_each_edit(
    tmp_path: Path,
) -> None:
    """With inotify only partly used up (one instance: the doorbell's), the failure itself
    says so and the watcher polls by stat: each of three edits is seen. Before, the probe of
    the kernel came after the failed watch had given its instance back, found one free,
    and the watcher retried for ever with a `watcher_failed` per edit and no edit seen."""
    seen = _watched_with("max_inotify_instances", 1, THREE_EDITS, tmp_path)
    assert seen["mode"] == "stat"
    assert seen["events"].count("watcher_inotify_used_up") == 1
    assert "watcher_failed" not in seen["events"]
