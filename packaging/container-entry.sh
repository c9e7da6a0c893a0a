#!/usr/bin/env bash
# Entry point of container images without systemd.
#
#   container-entry.sh [supervisord]   supervisord runs the daemon and restarts it if it dies
#                                      (the default; configuration: supervisord.conf)
#   container-entry.sh daemon [ARGS]   the daemon replaces this process: no restarts, so let
#                                      the container runtime restart the container, and run
#                                      with an init (`docker run --init`) to reap orphans
#   container-entry.sh CMD [ARGS…]     anything else, e.g. `gt daemon run` or a shell, through
#                                      agent-env.sh (beside this script): the agent shim folder
#                                      first on PATH and no token variable, so gt, its tmux
#                                      server and every agent they start use the shims
#
# Environment: TOWN_ID, CLOUD_API_URL, INTERNAL_API_KEY (the daemon's settings), and
#   SUPERVISORD_CONF        default /etc/gastown-sandboxd/supervisord.conf
#   GASTOWN_SUPERVISOR_RUN  supervisord's pid file and socket, default /run/gastown-sandboxd
#   GASTOWN_SANDBOXD_USER   the user the daemon runs as when started as root, default gt
#   GASTOWN_SANDBOXD_BIN    default gastown-sandboxd (from PATH)
#   GASTOWN_AGENT_ENV       default agent-env.sh beside this script

set -euo pipefail

mode=${1:-supervisord}
case $mode in
supervisord)
	export GASTOWN_SUPERVISOR_RUN=${GASTOWN_SUPERVISOR_RUN:-/run/gastown-sandboxd}
	mkdir -p -- "$GASTOWN_SUPERVISOR_RUN"
	chmod 0700 -- "$GASTOWN_SUPERVISOR_RUN"
	exec supervisord --nodaemon --configuration "${SUPERVISORD_CONF:-/etc/gastown-sandboxd/supervisord.conf}"
	;;
daemon)
	shift
	bin=${GASTOWN_SANDBOXD_BIN:-gastown-sandboxd}
	# The cloud calls the API from outside the container.
	export GASTOWN_SANDBOXD_LISTEN=${GASTOWN_SANDBOXD_LISTEN:-0.0.0.0:8080}
	if [[ $EUID -eq 0 ]]; then
		user=${GASTOWN_SANDBOXD_USER:-gt}
		account=$(getent passwd "$user") ||
			{ printf 'container-entry: no user %s in this image\n' "$user" >&2; exit 2; }
		# name:password:uid:gid:gecos:home:shell. The group is the user's primary group by
		# its id: a user whose group has another name (nobody's is nogroup, useradd -N
		# gives users) has no group of its own name for setpriv to find.
		IFS=: read -r _ _ _ gid _ home _ <<<"$account"
		# The env file and the town root default under HOME.
		export HOME=$home USER=$user LOGNAME=$user
		# setpriv execs in place: the daemon keeps this PID and receives the container's signals.
		exec setpriv --reuid="$user" --regid="$gid" --init-groups -- "$bin" run "$@"
	fi
	exec "$bin" run "$@"
	;;
*)
	exec "${GASTOWN_AGENT_ENV:-$(dirname -- "${BASH_SOURCE[0]}")/agent-env.sh}" "$@"
	;;
esac
