#!/usr/bin/env bash
# Runs a command as the sandbox must start gt, gt's daemon and gt's tmux server:
#   - the agent shim folder first on PATH, so every `claude`, `codex`, `kilo`, `gemini` or
#     `opencode` that gt or tmux starts is the shim, which runs the real CLI through
#     `gastown-sandboxd exec` with the current token;
#   - no gateway token variable in the environment: gt copies its own ANTHROPIC_AUTH_TOKEN
#     into every agent's startup command, and a token here would be stale within a day; nor
#     the internal API key or the cloud's signing secret, which no agent needs.
#
#   agent-env.sh CMD [ARGS…]     e.g.  agent-env.sh gt daemon run   ·   agent-env.sh bash -l
#
# Environment: GASTOWN_SANDBOXD_SHIM_DIR, the daemon's shim folder (default
# $XDG_DATA_HOME/gastown-sandboxd/bin, else ~/.local/share/gastown-sandboxd/bin).

set -euo pipefail

if [[ $# -eq 0 ]]; then
	printf 'agent-env: usage: agent-env.sh CMD [ARGS...]\n' >&2
	exit 2
fi
# An unset HOME expands ~ from the user database.
data_home=${XDG_DATA_HOME:-${HOME:-~}/.local/share}
shim_dir=${GASTOWN_SANDBOXD_SHIM_DIR:-$data_home/gastown-sandboxd/bin}
# As the daemon reads it: a leading ~/ is the home folder (a systemd EnvironmentFile or a
# Dockerfile ENV leaves it as written), and a relative path is made absolute. PATH, LookPath
# and tmux expand neither, and an agent would then bypass its shim.
tilde='~'
if [[ $shim_dir == "$tilde" || $shim_dir == "$tilde/"* ]]; then
	shim_dir=${HOME:-~}${shim_dir#"$tilde"}
fi
if [[ $shim_dir != /* ]]; then
	shim_dir=$PWD/$shim_dir
fi
rest=""
IFS=: read -r -a parts <<<"${PATH:-}"
for part in "${parts[@]}"; do
	# The shim folder goes first, once; empty entries (the current folder) go.
	if [[ -n $part && $part != "$shim_dir" ]]; then
		rest+=":$part"
	fi
done
export PATH="$shim_dir$rest"
# The daemon's and the cloud's secrets are not the agents' either: an agent (a model) could
# read the key that guards the daemon's API and the cloud's internal routes.
unset ANTHROPIC_AUTH_TOKEN KILOCODE_TOKEN KILO_JWT INTERNAL_API_KEY NEXTAUTH_SECRET
exec "$@"
