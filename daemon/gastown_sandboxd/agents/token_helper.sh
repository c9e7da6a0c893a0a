# Claude Code's apiKeyHelper, as the daemon writes it into Claude's settings:
#   /bin/sh .../gastown_sandboxd/agents/token_helper.sh ENV_FILE SOCKET PYTHON [TOWN]
# Prints the env file's token and nothing else when it is plainly acceptable (CONTRACT §3)
# now, without starting Python; in every other case it becomes `gastown-sandboxd token`
# (PYTHON -I -m gastown_sandboxd.agents token --env-file ENV_FILE --socket SOCKET
# [--town-id TOWN]), which
# judges the token in full and asks the daemon to refresh it when it must.
#
# "Plainly" is narrower than the rules, never wider: the last line naming KILO_JWT is
# `KILO_JWT=` and the token alone; its header is HS256's usual one, its signature 32 bytes;
# its payload is a flat JSON object of plain strings, whole numbers and literals, with no
# space and no escape, in which `type` is the sandbox's, `town_id` is TOWN (the daemon's,
# which the line carries; else $TOWN_ID when set),
# `sub` is a non-empty string, `iat` and `exp` whole numbers, the lifetime allowed, the issue
# time not ahead and the expiry more than the margin away, each with a second or two to
# spare (`date` counts whole seconds, and the token is used just after). Anything else goes
# to Python. Claude Code runs the helper once per TTL per session: this way it costs a
# shell, `date` and `base64`, not an interpreter.

set -u
LC_ALL=C  # bytes, and character classes of ASCII alone
export LC_ALL
env_file=$1 socket=$2 python=$3 want_town=${4:-${TOWN_ID:-}}

full() {
    if [ -n "${want_town}" ]; then
        exec "${python}" -I -m gastown_sandboxd.agents token --env-file "${env_file}" \
            --socket "${socket}" --town-id "${want_town}"
    fi
    exec "${python}" -I -m gastown_sandboxd.agents token --env-file "${env_file}" --socket "${socket}"
}

[ -f "${env_file}" ] || full
[ -r "${env_file}" ] || full
token=
while IFS= read -r line || [ -n "${line}" ]; do
    case ${line} in
        *KILO_JWT*)
            case ${line} in
                KILO_JWT=*) token=${line#KILO_JWT=} ;;
                *) token= ;;  # `export`, spaces, a comment: not plain
            esac ;;
        *) ;;
    esac
done < "${env_file}" || full

case ${token} in
    '' | *[!A-Za-z0-9_.-]*) full ;;
    *) ;;
esac
[ "${#token}" -le 8192 ] || full
header=${token%%.*}
rest=${token#*.}
payload=${rest%%.*}
signature=${rest#*.}
[ "${header}" = eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9 ] || full  # {"alg":"HS256","typ":"JWT"}
case ${signature} in
    *.*) full ;;
    *) ;;
esac
[ "${#signature}" -eq 43 ] || full
# Canonical base64url, as the rules ask: the unused low bits of the last character are zero.
case ${signature} in
    *[AEIMQUYcgkosw048]) ;;
    *) full ;;
esac
# The same for the payload, and the padding its base64 form takes.
case $((${#payload} % 4)) in
    0) padding='' ;;
    2) case ${payload} in *[AQgw]) padding='==' ;; *) full ;; esac ;;
    3) case ${payload} in *[AEIMQUYcgkosw048]) padding='=' ;; *) full ;; esac ;;
    *) full ;;
esac

# base64url to base64, padded, without a process of its own.
b64=
rest=${payload}
while :; do
    case ${rest} in
        *[-_]*)
            head=${rest%%[-_]*}
            rest=${rest#"${head}"}
            case ${rest} in
                -*) b64=${b64}${head}+ ;;
                *) b64=${b64}${head}/ ;;
            esac
            rest=${rest#?} ;;
        *)
            b64=${b64}${rest}${padding}
            break ;;
    esac
done
# (bash warns of a NUL it drops: not a word of that reaches Claude Code.)
{ json=$(printf '%s' "${b64}" | base64 -d 2>/dev/null); } 2>/dev/null || full
# Printable ASCII alone, every byte kept: a NUL or a trailing newline that the shell dropped
# makes the length differ from what the payload encodes.
case ${json} in
    *[![:print:]]*) full ;;
    *) ;;
esac
[ "${#json}" -eq $((${#b64} * 3 / 4 - ${#padding})) ] || full

# A flat object: "key":"string" | "key":digits | "key":true|false|null, comma-separated.
type='' town='' sub='' iat='' exp='' seen=''
case ${json} in
    '{'*'}') rest=${json#'{'} ;;
    *) full ;;
esac
while :; do
    case ${rest} in
        '"'*) rest=${rest#'"'} ;;
        *) full ;;
    esac
    key=${rest%%'"'*}
    case ${key} in
        *\\* | '') full ;;
        *) ;;
    esac
    rest=${rest#"${key}"}
    case ${rest} in
        '":'*) rest=${rest#'":'} ;;
        *) full ;;
    esac
    case ${rest} in
        '"'*)
            rest=${rest#'"'}
            case ${rest} in
                *'"'*) ;;
                *) full ;;
            esac
            value=${rest%%'"'*}
            case ${value} in
                *\\*) full ;;
                *) ;;
            esac
            rest=${rest#"${value}"'"'}
            kind=string ;;
        [0-9]*)
            value=${rest%%[!0-9]*}
            rest=${rest#"${value}"}
            case ${value} in
                0?*) full ;;  # a leading zero: not JSON (and octal to the shell)
                *) ;;
            esac
            # Python's json refuses an integer of more than 4,300 digits, in any field.
            [ "${#value}" -le 15 ] || full
            kind=number ;;
        true* | false* | null*)
            value=${rest%%[!a-z]*}
            rest=${rest#"${value}"}
            case ${value} in
                true | false | null) ;;
                *) full ;;
            esac
            kind=literal ;;
        *) full ;;
    esac
    case " ${seen} " in
        *" ${key} "*) full ;;  # a key twice: JSON parsers disagree on which wins
        *) seen="${seen} ${key}" ;;
    esac
    case ${key}:${kind} in
        type:string) type=${value} ;;
        town_id:string) town=${value} ;;
        sub:string) sub=${value} ;;
        iat:number) iat=${value} ;;
        exp:number) exp=${value} ;;
        type:* | town_id:* | sub:* | iat:* | exp:*) full ;;
        *) ;;
    esac
    case ${rest} in
        ,*) rest=${rest#,} ;;
        '}') break ;;
        *) full ;;
    esac
done

[ "${type}" = gastown_sandbox ] || full
[ -n "${sub}" ] || full
[ -z "${want_town}" ] || [ "${town}" = "${want_town}" ] || full
[ -n "${iat}" ] || full
[ -n "${exp}" ] || full
[ "${#iat}" -le 15 ] || full
[ "${#exp}" -le 15 ] || full
now=$(date +%s) || full
case ${now} in
    # A `date` without %s, or an odd one: no arithmetic on what it printed (a leading zero
    # is octal to the shell, and bash then goes on past the error).
    '' | *[!0-9]* | 0?*) full ;;
    *) ;;
esac
[ "${#now}" -le 15 ] || full
lifetime=$((exp - iat))
[ "${lifetime}" -ge 10 ] || full
[ "${lifetime}" -le 604800 ] || full
margin=60
[ "${lifetime}" -ge 600 ] || margin=$(((lifetime + 9) / 10))
[ $((exp - now)) -gt $((margin + 2)) ] || full
[ $((iat - now)) -le 299 ] || full
printf '%s\n' "${token}"
