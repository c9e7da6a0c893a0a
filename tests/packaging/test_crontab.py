"""packaging/crontab: its job line, run as cron would run it (sh, flock, logger) for real."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import anyio

from gastown_cloud.tokens import verify_gastown_token
from tests.fixtures.cloud import CloudServer

from .conftest import StandInCloud
from .test_refresh_token_sh import KEY, SCRIPT, TOWN, mint

CRONTAB = Path(__file__).resolve().parents[2] / "packaging" / "crontab"
INSTALLED_SCRIPT = "/usr/local/lib/gastown-sandboxd/refresh-token.sh"
SETTINGS = "/etc/gastown-sandboxd/env"

# Stands in for logger(1), which needs a syslog socket: records its arguments and its input.
LOGGER = """#!/bin/sh
printf '%s\\n' "$*" > "$LOGGER_RECORD.args"
cat > "$LOGGER_RECORD.input"
"""


def job() -> tuple[list[str], str, str]:
    """The schedule fields, the user, and the command of the one job line."""
    lines = [
        line
        for line in CRONTAB.read_text().splitlines()
        if line.strip() and not line.startswith("#") and "=" not in line.split()[0]
    ]
    assert len(lines) == 1, lines
    fields = lines[0].split(None, 6)
    return fields[:5], fields[5], fields[6]


def test_job_line() -> None:
    """Every 2 hours as gt, under flock -n, into syslog, with the installed script."""
    schedule, user, command = job()
    assert schedule[1:] == ["*/2", "*", "*", "*"]
    assert 0 <= int(schedule[0]) < 60
    assert user == "gt"
    assert "flock -n " in command
    assert INSTALLED_SCRIPT in command
    assert "2>&1 | logger -t gastown-refresh-token" in command
    # cron turns % into newlines; a secret must never be written into a world-readable file.
    assert "%" not in command
    assert "INTERNAL_API_KEY=" not in CRONTAB.read_text()


async def run_job(
    tmp_path: Path, cloud_url: str, *, town: str = TOWN, key: str = KEY
) -> tuple[int, Path]:
    """Run the job's command with /bin/sh as cron would, paths pointed into tmp_path."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    settings = tmp_path / "settings.env"
    settings.write_text(
        f"TOWN_ID={town}\nCLOUD_API_URL={cloud_url}\nINTERNAL_API_KEY={key}\n"
        f"GASTOWN_ENV_FILE={home / '.env.gateway'}\n"
    )
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "logger").write_text(LOGGER)
    (stubs / "logger").chmod(0o755)
    _, _, command = job()
    command = command.replace(SETTINGS, str(settings)).replace(INSTALLED_SCRIPT, str(SCRIPT))
    # cron's environment: HOME, SHELL and the crontab's PATH; the venv first for python3.
    path = os.pathsep.join([str(stubs), str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    env = {"HOME": str(home), "PATH": path, "LOGGER_RECORD": str(tmp_path / "logger")}
    result = await anyio.run_process(["/bin/sh", "-c", command], env=env, check=False)
    return result.returncode, home / ".env.gateway"


async def test_job_refreshes_and_logs(tmp_path: Path, standin_cloud: StandInCloud) -> None:
    """The job sources the settings, refreshes the env file, and logs one line via logger."""
    token = mint()
    standin_cloud.answer_text(token)
    code, env_file = await run_job(tmp_path, standin_cloud.url)
    assert code == 0
    assert env_file.read_text() == f"KILO_JWT={token}\n"
    assert (tmp_path / "logger.args").read_text() == "-t gastown-refresh-token\n"
    logged = (tmp_path / "logger.input").read_text()
    assert logged.startswith("refresh-token: refreshed, town ")
    assert token not in logged
    assert KEY not in logged


async def test_job_logs_failures(tmp_path: Path, standin_cloud: StandInCloud) -> None:
    """A failing refresh reaches syslog as its one line (stderr joins stdout)."""
    standin_cloud.answer_text("oops", status=503)
    _, env_file = await run_job(tmp_path, standin_cloud.url)
    assert not env_file.exists()
    logged = (tmp_path / "logger.input").read_text()
    assert logged == "refresh-token: the cloud is busy (HTTP 503)\n"


async def test_job_skips_while_another_runs(tmp_path: Path, standin_cloud: StandInCloud) -> None:
    """While a run holds the lock, the next one does nothing (flock -n)."""
    standin_cloud.answer_text(mint())
    home = tmp_path / "home"
    home.mkdir()
    with (home / ".gastown-refresh-token.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _, env_file = await run_job(tmp_path, standin_cloud.url)
    assert not env_file.exists()
    assert standin_cloud.requests == []


async def test_job_binds_with_the_provisioned_token_on_the_real_cloud(
    tmp_path: Path, cloud: CloudServer
) -> None:
    """Against gastown_cloud (binding on): with createTown's token in the env file the job
    sends it as Bearer and writes the new token; with no token it is refused, logged, and the
    env file is left alone."""
    town, initial = cloud.create_town(user_id="cron-user")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".env.gateway").write_text(f"KILO_JWT={initial}\n")
    code, env_file = await run_job(tmp_path, cloud.url, town=town["id"], key=cloud.internal_key)
    assert code == 0
    (line,) = env_file.read_text().splitlines()
    refreshed = line.removeprefix("KILO_JWT=")
    assert verify_gastown_token(refreshed, secret=cloud.secret).town_id == town["id"]
    # Within the same second the cloud mints the same token again: "unchanged" then.
    assert ", town " in (tmp_path / "logger.input").read_text()

    env_file.write_text("OTHER=1\n")
    await run_job(tmp_path, cloud.url, town=town["id"], key=cloud.internal_key)
    assert env_file.read_text() == "OTHER=1\n"
    logged = (tmp_path / "logger.input").read_text()
    assert "HTTP 401" in logged
    assert "no token of town" in logged
