"""What a shim adds to an agent's start: wall time from spawn to exit, shim vs bare binary.

The "agent" is a copy of /bin/true, so every figure is start-up cost alone. Each row runs the
same command many times (one at a time) and reports the median wall time, with the bare
binary's median from the same run as the baseline, and the CPU time per start (user + system,
from the children's rusage: a busy machine stretches wall time far more than CPU time):

- bare binary: the copy of /bin/true, by absolute path (the baseline);
- Python start: `python -I -c pass`, the least any Python step costs;
- shim (kilo): the daemon-written shim, `/bin/sh` → `python -I -m gastown_sandboxd.agents exec`
  → the binary, with a fresh token in the env file (no socket call);
- shim (claude): the same, plus reading Claude Code's settings for the daemon's helper;
- `gastown-sandboxd exec`: the console script wrapping the binary, what a legacy gt
  `exec_wrapper` costs; its entry sends `exec` and `token` to the light entry;
- `exec` through the whole command line (`cli.main`, with all its imports), as the console
  script ran it before that: shown beside the two to say why they take the light entry;
- Claude Code's apiKeyHelper: the line the daemon writes into Claude's settings, run by
  `/bin/sh -c` as Claude Code runs it (`token_helper.sh`, with a fresh token: no Python), what
  each Claude session pays once per helper TTL; beside it `gastown-sandboxd token` through
  the light entry, what the script hands over to when the token is not plainly acceptable.

`python -m bench.agents_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.daemon.minting import mint

from gastown_sandboxd.agents.claude import helper_command
from gastown_sandboxd.agents.shims import ShimSpec, sync_shims

from ._stats import percentile
from ._table import Row, main_of

# The command line as the console script ran `exec` before its entry sent it to the light one.
WHOLE_COMMAND_LINE = (
    "import sys; from gastown_sandboxd.__main__ import DAEMON_NEVER_USED, run_entry; "
    "sys.exit(run_entry('gastown_sandboxd.cli', DAEMON_NEVER_USED))"
)


def _time(argv: Sequence[str], env: dict[str, str], runs: int) -> tuple[list[float], float]:
    """Wall milliseconds of `runs` sequential runs of `argv` (after one untimed warm-up), and
    the CPU milliseconds (user + system) each run took on average, which load disturbs less."""
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    samples = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
        samples.append((time.perf_counter() - started) * 1000)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return samples, cpu * 1000 / runs


def run(quick: bool) -> list[Row]:
    runs = 15 if quick else 60
    with tempfile.TemporaryDirectory(prefix="agents-bench-") as tmp:
        root = Path(tmp)
        real, shims, home = root / "real", root / "shims", root / "home"
        for folder in (real, shims, home / ".claude"):
            folder.mkdir(parents=True)
        for name in ("kilo", "claude", "true"):
            shutil.copy("/bin/true", real / name)
        env_file, socket = root / ".env.gateway", root / "no-daemon.sock"
        env_file.write_text(f"KILO_JWT={mint(time.time())}\n")
        command = helper_command(python=sys.executable, env_file=env_file, socket=socket)
        (home / ".claude" / "settings.json").write_text(json.dumps({"apiKeyHelper": command}))
        spec = ShimSpec(
            python=sys.executable, env_file=env_file, socket=socket, claude_helper_ttl_ms=300_000
        )
        sync_shims(["kilo", "claude"], shim_dir=shims, spec=spec, environ={"PATH": str(real)})
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
        cli = Path(sys.executable).parent / "gastown-sandboxd"
        paths = ["--env-file", str(env_file), "--socket", str(socket)]
        bare = str(real / "true")
        light = [sys.executable, "-I", "-m", "gastown_sandboxd.agents"]
        cases = {
            "bare binary": [bare],
            "Python start (-I -c pass)": [sys.executable, "-I", "-c", "pass"],
            "shim (kilo)": [str(shims / "kilo")],
            "shim (claude, helper check)": [str(shims / "claude")],
            "gastown-sandboxd exec": [str(cli), "exec", *paths, "--", bare],
            "exec through the whole command line": [
                *(sys.executable, "-c", WHOLE_COMMAND_LINE, "exec", *paths, "--", bare)
            ],
            "apiKeyHelper (token_helper.sh)": ["/bin/sh", "-c", command],
            "token (the light entry)": [*light, "token", *paths],
        }
        timed = {name: _time(argv, env, runs) for name, argv in cases.items()}
    base = percentile(timed["bare binary"][0], 50)
    rows = []
    for name, (samples, cpu) in timed.items():
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        note = f"p99 {p99:.1f} ms; CPU {cpu:.1f} ms per start; {runs} runs"
        if name.startswith("shim"):
            note += f"; adds {p50 - base:.1f} ms"
        rows.append(
            Row(f"{name} start→exit p50", p50, "ms", None if name == "bare binary" else base, note)
        )
    return rows


if __name__ == "__main__":
    quick = "15 runs per case instead of 60"
    raise SystemExit(
        main_of(run, name="agents_bench", doc=__doc__, quick=quick, title="agents_bench")
    )
