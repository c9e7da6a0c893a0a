# Sourced by every login shell (install as /etc/profile.d/gastown-sandboxd.sh): the agent shim
# folder first on PATH, once. A login shell runs /etc/profile, which on Debian and Ubuntu sets
# PATH anew: `agent-env.sh bash -l`, and every tmux pane started without a command (tmux's
# default is a login shell), lost the shim folder, and the agents started there ran their
# CLIs without their shims. The folder is found as the daemon and agent-env.sh find it:
# GASTOWN_SANDBOXD_SHIM_DIR, else $XDG_DATA_HOME/gastown-sandboxd/bin, else
# ~/.local/share/gastown-sandboxd/bin. POSIX sh: /etc/profile is read by dash too.

_gastown_shims=${GASTOWN_SANDBOXD_SHIM_DIR:-${XDG_DATA_HOME:-${HOME:-}/.local/share}/gastown-sandboxd/bin}
_gastown_tilde='~'  # a leading ~ as written (an EnvironmentFile or ENV leaves it): the home
case ${_gastown_shims} in
    "${_gastown_tilde}") _gastown_shims=${HOME:-} ;;
    "${_gastown_tilde}"/*) _gastown_shims=${HOME:-}${_gastown_shims#"${_gastown_tilde}"} ;;
    *) ;;
esac
case ${_gastown_shims} in
    /*) ;;
    *) _gastown_shims=${PWD}/${_gastown_shims} ;;
esac
_gastown_rest=
_gastown_ifs=${IFS}
_gastown_noglob=
case $- in
    *f*) ;;
    *) set -f; _gastown_noglob=1 ;;
esac
IFS=:
for _gastown_part in ${PATH:-}; do
    # The shim folder goes first, once; empty entries (the current folder) go.
    if [ -n "${_gastown_part}" ] && [ "${_gastown_part}" != "${_gastown_shims}" ]; then
        _gastown_rest=${_gastown_rest}:${_gastown_part}
    fi
done
IFS=${_gastown_ifs}
[ -z "${_gastown_noglob}" ] || set +f
PATH=${_gastown_shims}${_gastown_rest}
export PATH
unset _gastown_tilde _gastown_shims _gastown_rest _gastown_ifs _gastown_noglob _gastown_part
