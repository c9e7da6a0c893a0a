#!/usr/bin/env bash
# Fallback refresher of a Gas Town sandbox's gateway token, for cron.
#
# Prefer the daemon (`gastown-sandboxd run`): it refreshes from the token's own expiry with
# backoff, honours Retry-After, reports state and events. This script is the seed's cron job
# made safe: it asks the cloud once, writes the env file only when the answer is an acceptable
# token (contract §3), and otherwise leaves the env file exactly as it was.
#
# Settings (environment, as the daemon reads them):
#   TOWN_ID            required
#   CLOUD_API_URL      cloud base URL, else KILO_API_URL
#   INTERNAL_API_KEY   required, at least 16 characters
#   GASTOWN_ENV_FILE   default $HOME/.env.gateway
#   REFRESH_TOKEN_CONNECT_TIMEOUT, REFRESH_TOKEN_MAX_TIME   seconds, default 5 and 15
#
# Exit 0 with one line on stdout when the token was refreshed (or is unchanged);
# exit 2 on a missing or bad setting, 1 on any other failure, each with one line on stderr.
# Neither the key nor a token is ever printed or put on a command line.

set -euo pipefail
umask 077
# Byte-wise regexes and English messages from the tools whose errors are matched below.
export LC_ALL=C

readonly PROG=refresh-token
readonly MAX_ANSWER_BYTES=16384
readonly JWT_RE='^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$'
readonly KILO_JWT_LINE_RE=$'^[ \t]*(export[ \t]+)?KILO_JWT='

work_dir=''
env_tmp=''

fail() {
	local code=$1
	shift
	printf '%s: %s\n' "$PROG" "$*" >&2
	exit "$code"
}

cleanup() {
	if [[ -n $env_tmp ]]; then rm -f -- "$env_tmp"; fi
	if [[ -n $work_dir ]]; then rm -rf -- "$work_dir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# A failure this script did not foresee still ends with one line and the env file untouched.
trap 'fail 1 "unexpected failure at line $LINENO"' ERR

usage() {
	printf 'usage: %s\n' "$PROG"
	printf 'Refresh KILO_JWT in the env file from the cloud; settings come from the environment:\n'
	printf '  TOWN_ID, CLOUD_API_URL (or KILO_API_URL), INTERNAL_API_KEY, GASTOWN_ENV_FILE\n'
}

# Validates the response and prints "token exp fingerprint"; reads the answer on stdin so the
# token never becomes part of any program text or argument list.
read -r -d '' CHECK_PY <<'PY' || true
import base64, binascii, datetime, hashlib, json, re, sys, time

JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
MAX_TOKEN_BYTES = 8192
MAX_LIFETIME = 7 * 24 * 3600
SIGNATURE_BYTES = 32


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def raw(text):
    """The bytes of canonical unpadded base64url text (length mod 4 != 1), or None."""
    if len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        return None
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != text:
        return None
    return data


def segment(text):
    data = raw(text)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def signed(text):
    """An HS256 signature is 32 bytes: 43 characters. A body cut short still matches JWT."""
    signature = raw(text)
    return signature is not None and len(signature) == SIGNATURE_BYTES


def extract(raw):
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        fail("the cloud's answer is not text")
    if JWT.fullmatch(text):
        return text
    try:
        doc = json.loads(text)
    except ValueError:
        fail("the cloud's answer holds no token (neither a JWT nor JSON)")
    found = None
    if isinstance(doc, dict):
        found = doc.get("token")
        result = doc.get("result")
        if found is None and isinstance(result, dict):
            data = result.get("data")
            found = data.get("json") if isinstance(data, dict) else data
    if not isinstance(found, str):
        fail("the cloud's JSON answer holds no token")
    return found


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def problem(token, town_id, now):
    """Return why the token is not acceptable (contract §3), or None."""
    # surrogatepass: a JSON answer's lone "\ud800" is counted, then refused below as not
    # base64url, rather than raising (its traceback's first line was the one-line error).
    if len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
        return "token is larger than 8 KiB"
    if not JWT.fullmatch(token):
        return "token is not three base64url segments"
    header_text, payload_text, signature_text = token.split(".")
    header, claims = segment(header_text), segment(payload_text)
    if header is None or claims is None:
        return "token header or payload is not a base64url JSON object"
    if header.get("alg") != "HS256":
        return "token alg is not HS256"
    if not signed(signature_text):
        return "token signature is cut or malformed (HS256 signs with 43 base64url characters)"
    if claims.get("type") != "gastown_sandbox":
        return "token type is not gastown_sandbox"
    if claims.get("town_id") != town_id:
        return "token belongs to another town"
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        return "token sub is not a non-empty string"
    iat, exp = claims.get("iat"), claims.get("exp")
    if not (is_int(iat) and is_int(exp)):
        return "token iat and exp are not integers"
    lifetime = exp - iat
    if not 10 <= lifetime <= MAX_LIFETIME:
        return "token lifetime is not between 10 s and 7 days"
    if exp - now <= min(60, lifetime / 10):
        return "token is expired or about to expire"
    if iat - now > 300:
        return "token iat is more than 300 s ahead"
    return None


mode, town_id = sys.argv[1], sys.argv[2]
if mode == "bindable":
    # The cloud refuses (403) a Bearer of another town or with a broken signature: only a
    # whole token of this town binds.
    token = sys.stdin.read().strip()
    parts = token.split(".") if JWT.fullmatch(token) else None
    claims = segment(parts[1]) if parts else None
    bindable = claims is not None and claims.get("town_id") == town_id and signed(parts[2])
    sys.exit(0 if bindable else 1)
if mode == "later":
    # The env file's token, read again just before the rename: exit 0 when it is acceptable
    # and expires no sooner than the one about to be written (argv[3]).
    token = sys.stdin.read().strip()
    if problem(token, town_id, time.time()) is not None:
        sys.exit(1)
    sys.exit(0 if segment(token.split(".")[1])["exp"] >= int(sys.argv[3]) else 1)
token = extract(sys.stdin.buffer.read())
reason = problem(token, town_id, time.time())
if reason is not None:
    fail("the cloud's answer is not an acceptable token: " + reason)
exp = segment(token.split(".")[1])["exp"]
expires = datetime.datetime.fromtimestamp(exp, datetime.timezone.utc)
fingerprint = hashlib.sha256(token.encode("ascii")).hexdigest()[-8:]
print(token, expires.strftime("%Y-%m-%dT%H:%M:%SZ"), fingerprint, exp)
PY

# --- settings -------------------------------------------------------------------------------

if [[ $# -gt 0 ]]; then
	case $1 in
	-h | --help)
		usage
		exit 0
		;;
	*) fail 2 "takes no arguments (settings come from the environment; see --help)" ;;
	esac
fi

town_id=${TOWN_ID:-}
cloud_url=${CLOUD_API_URL:-${KILO_API_URL:-}}
api_key=${INTERNAL_API_KEY:-}
connect_timeout=${REFRESH_TOKEN_CONNECT_TIMEOUT:-5}
max_time=${REFRESH_TOKEN_MAX_TIME:-15}

[[ -n $town_id ]] || fail 2 "TOWN_ID is not set: export the town's id"
# The id goes into a JSON body and messages, so only a plain charset passes.
[[ $town_id =~ ^[A-Za-z0-9._:-]{1,128}$ ]] ||
	fail 2 "TOWN_ID has characters other than letters, digits and . _ : - (or is over 128)"
[[ -n $cloud_url ]] || fail 2 "CLOUD_API_URL (or KILO_API_URL) is not set: export the cloud's base URL"
[[ $cloud_url =~ ^https?://[^[:space:][:cntrl:]]+$ ]] ||
	fail 2 "CLOUD_API_URL must be an http:// or https:// URL without spaces"
cloud_url=${cloud_url%/}
[[ -n $api_key ]] || fail 2 "INTERNAL_API_KEY is not set: export the town's internal API key"
[[ ${#api_key} -ge 16 ]] || fail 2 "INTERNAL_API_KEY is shorter than 16 characters"
# A line break in a header value would let the key smuggle in other headers.
[[ ! $api_key =~ [[:cntrl:]] ]] || fail 2 "INTERNAL_API_KEY holds control characters"
if [[ -n ${GASTOWN_ENV_FILE:-} ]]; then
	env_file=$GASTOWN_ENV_FILE
	# A leading ~ as written (a systemd EnvironmentFile, a Dockerfile ENV, a quoted line
	# leave it) is the home folder, as the daemon reads it.
	tilde='~'
	if [[ $env_file == "$tilde" || $env_file == "$tilde/"* ]]; then
		[[ -n ${HOME:-} ]] || fail 2 "GASTOWN_ENV_FILE starts with ~ and HOME is not set"
		env_file=$HOME${env_file#"$tilde"}
	fi
elif [[ -n ${HOME:-} ]]; then
	env_file=$HOME/.env.gateway
else
	fail 2 "neither GASTOWN_ENV_FILE nor HOME is set: export GASTOWN_ENV_FILE"
fi
[[ $connect_timeout =~ ^[0-9]+(\.[0-9]+)?$ ]] || fail 2 "REFRESH_TOKEN_CONNECT_TIMEOUT is not a number of seconds"
[[ $max_time =~ ^[0-9]+(\.[0-9]+)?$ ]] || fail 2 "REFRESH_TOKEN_MAX_TIME is not a number of seconds"

command -v curl >/dev/null 2>&1 || fail 1 "curl is not installed"
command -v python3 >/dev/null 2>&1 || fail 1 "python3 is not installed"

# A symlink there is taken for the file it leads to, as the daemon takes it: the rename below
# would replace the link with a file, and the file it led to would keep the old token.
if [[ -L $env_file ]]; then
	env_file=$(readlink -f -- "$env_file") || fail 2 "GASTOWN_ENV_FILE is a symlink that leads nowhere: $env_file"
fi
env_dir=$(dirname -- "$env_file")
env_name=$(basename -- "$env_file")
[[ -d $env_dir ]] || fail 2 "the folder of GASTOWN_ENV_FILE does not exist: $env_dir"
[[ ! -d $env_file ]] || fail 2 "GASTOWN_ENV_FILE is a folder: $env_file"
if [[ -e $env_file && ! -r $env_file ]]; then
	fail 1 "cannot read the env file $env_file"
fi

# --- current token (for the Bearer binding) -------------------------------------------------

# Prints the env file's token (its last KILO_JWT line's value, as a shell that sources it
# gets), or nothing.
env_file_token() {
	local line found=''
	if [[ -e $env_file ]]; then
		while IFS= read -r line || [[ -n $line ]]; do
			if [[ $line =~ $KILO_JWT_LINE_RE ]]; then
				# The token's characters after an opening quote, if any: whatever follows
				# them (a closing quote, blanks, a comment, `; export KILO_JWT`, a CR) is
				# no part of a JWT. Cut only at a CR and quotes, a trailing blank or
				# comment sent no Bearer, and the cloud answered 401 for good.
				found=${line#*=}
				found=${found#[\"\']}
				if [[ $found =~ ^[A-Za-z0-9._-]+ ]]; then
					found=${BASH_REMATCH[0]}
				else
					found=''
				fi
			fi
		done <"$env_file" || return 1
	fi
	printf '%s' "$found"
}
# shellcheck disable=SC2310 # the failure is handled here
current=$(env_file_token) || fail 1 "cannot read the env file $env_file"

# --- private files: the temp file beside the env file proves it can be written before asking --

work_dir=$(mktemp -d 2>/dev/null) || fail 1 "cannot create a temporary folder (TMPDIR)"
env_tmp=$(mktemp -- "$env_dir/.$env_name.XXXXXXXX.tmp" 2>/dev/null) ||
	fail 1 "cannot create a file in $env_dir: the env file's folder is not writable"

# Headers from a 0600 file, so neither the key nor the token shows in the process list.
# The cloud binds a refresh to the town's current token (Bearer; expired is fine): the key
# alone refreshes no town unless the cloud runs with --allow-unbound-refresh.
headers=$work_dir/headers
bound=0
{
	printf 'x-internal-api-key: %s\n' "$api_key"
	if [[ $current =~ $JWT_RE ]] && python3 -I -c "$CHECK_PY" bindable "$town_id" <<<"$current" 2>/dev/null; then
		printf 'Authorization: Bearer %s\n' "$current"
		bound=1
	fi
} >"$headers"

# --- ask the cloud ---------------------------------------------------------------------------

answer=$work_dir/answer
answer_headers=$work_dir/answer-headers
curl_err=$work_dir/curl-err
curl_rc_file=$work_dir/curl-rc
url=$cloud_url/api/gastown/refresh-token
# -q first: no ~/.curlrc may change where the key goes. head caps a body sent without a
# Content-Length, which --max-filesize cannot see in advance. curl's status goes to a file,
# since a failing pipeline would fire the ERR trap.
{
	curl -q --fail --silent --show-error \
		--connect-timeout "$connect_timeout" --max-time "$max_time" \
		--proto =http,https --max-filesize "$MAX_ANSWER_BYTES" \
		-X POST -H 'Content-Type: application/json' -H "@$headers" \
		--data-binary "{\"townId\": \"$town_id\"}" \
		-D "$answer_headers" -- "$url" 2>"$curl_err" || echo "$?" >"$curl_rc_file"
} | head -c "$((MAX_ANSWER_BYTES + 1))" >"$answer" || true
curl_rc=0
if [[ -s $curl_rc_file ]]; then read -r curl_rc <"$curl_rc_file"; fi

answer_size=$(wc -c <"$answer")
if [[ $answer_size -gt $MAX_ANSWER_BYTES || $curl_rc -eq 63 ]]; then
	fail 1 "the cloud's answer is larger than $MAX_ANSWER_BYTES bytes"
fi
# The answer's status (the last status line, after any 100 Continue) and its
# Retry-After, read once for the failure below and for the check that only a 200 is taken.
status=''
retry_after=''
if [[ -f $answer_headers ]]; then
	while IFS= read -r line; do
		line=${line%$'\r'}
		if [[ $line =~ ^HTTP/[0-9.]+\ ([0-9]{3}) ]]; then status=${BASH_REMATCH[1]}; fi
		if [[ $line =~ ^[Rr]etry-[Aa]fter:\ *([0-9A-Za-z,: ]{1,40})$ ]]; then retry_after=${BASH_REMATCH[1]}; fi
	done <"$answer_headers"
fi
if [[ $curl_rc -ne 0 ]]; then
	reason=$(head -n 1 -- "$curl_err" | tr -d '[:cntrl:]')
	reason=${reason#curl: }
	case $curl_rc:$status in
	22:401 | 22:403)
		if [[ $bound -eq 0 ]]; then
			fail 1 "the cloud refused (HTTP $status): the env file holds no token of town $town_id to bind the refresh; write the town's first token (from createTown) into it"
		fi
		fail 1 "the cloud refused the key or the token binding (HTTP $status)"
		;;
	22:404 | 22:410) fail 1 "town $town_id is unknown or destroyed (HTTP $status)" ;;
	22:409 | 22:423) fail 1 "town $town_id is stopped (HTTP $status)" ;;
	22:429 | 22:503) fail 1 "the cloud is busy (HTTP $status${retry_after:+, Retry-After $retry_after})" ;;
	22:*) fail 1 "the cloud answered HTTP ${status:-error}" ;;
	28:*) fail 1 "no answer in time from the cloud at $url: $reason" ;;
	*) fail 1 "cannot reach the cloud at $url: $reason" ;;
	esac
fi

# Only a 200 carries a token (the daemon takes nothing else): curl --fail passes 2xx and 3xx.
if [[ $status != 200 ]]; then
	fail 1 "the cloud answered HTTP ${status:-with no status line}, not 200 with a token"
fi

# --- check the answer before anything is written ---------------------------------------------

check_err=$work_dir/check-err
verdict=''
if ! verdict=$(python3 -I -c "$CHECK_PY" check "$town_id" <"$answer" 2>"$check_err"); then
	reason=$(head -n 1 -- "$check_err" | tr -d '[:cntrl:]')
	fail 1 "${reason:-cannot check the answer of the cloud (python3 failed)}"
fi
read -r token expires fingerprint exp <<<"$verdict"
[[ $token =~ $JWT_RE ]] || fail 1 "cannot check the cloud's answer"

# --- write: every other line kept, KILO_JWT=<token> exactly once -----------------------------

# Every write is checked: run in a condition, as here, bash turns errexit and the ERR trap off,
# and a full disk would leave a short file that the rename below would put in place.
write_env() {
	local placed=0 newline=$'\n' line
	if [[ -e $env_file ]]; then
		# Each line keeps its own ending, a last line without one included.
		while true; do
			if IFS= read -r line; then
				newline=$'\n'
			elif [[ -n $line ]]; then
				newline=''
			else
				break
			fi
			if [[ $line =~ $KILO_JWT_LINE_RE ]]; then
				if [[ $placed -eq 0 ]]; then
					printf 'KILO_JWT=%s\n' "$token" || return 1
					placed=1
				fi
			else
				printf '%s%s' "$line" "$newline" || return 1
			fi
			if [[ -z $newline ]]; then break; fi
		done <"$env_file"
	fi
	if [[ $placed -eq 0 ]]; then
		if [[ -z $newline ]]; then printf '\n' || return 1; fi
		printf 'KILO_JWT=%s\n' "$token" || return 1
	fi
}
written=1
# shellcheck disable=SC2310 # errexit is off in here by design: write_env checks each write
write_env >"$env_tmp" 2>/dev/null || written=0
token_lines=$(grep -cFx -- "KILO_JWT=$token" "$env_tmp" 2>/dev/null || true)
if [[ $written -eq 0 || $token_lines != 1 ]]; then
	fail 1 "cannot write a file in $env_dir"
fi

summary="town $town_id, token fingerprint $fingerprint, expires $expires"
if [[ -f $env_file ]] && cmp -s -- "$env_tmp" "$env_file"; then
	printf '%s: unchanged, %s\n' "$PROG" "$summary"
	exit 0
fi
chmod 0600 -- "$env_tmp" 2>/dev/null || fail 1 "cannot set mode 0600 on a file in $env_dir"
sync -- "$env_tmp" 2>/dev/null || sync
# The daemon (or another run of this script) may have written a newer token while the cloud
# was asked: never rename an older one over it. Read again just before the rename, which
# narrows the window from the cloud's answer time to this check's (a python3 start).
# shellcheck disable=SC2310 # an unreadable env file here is left to the rename below
on_disk=$(env_file_token 2>/dev/null) || on_disk=''
if [[ -n $on_disk && $on_disk != "$current" && $on_disk != "$token" ]] &&
	python3 -I -c "$CHECK_PY" later "$town_id" "$exp" <<<"$on_disk" 2>/dev/null; then
	printf '%s: unchanged, the env file was given a token expiring no sooner meanwhile (town %s)\n' "$PROG" "$town_id"
	exit 0
fi
if ! mv_err=$(mv -f -T -- "$env_tmp" "$env_file" 2>&1); then
	# A bind-mounted env file cannot be renamed over: rewrite it in place, as the daemon does.
	if [[ $mv_err == *'Device or resource busy'* || $mv_err == *'Invalid cross-device link'* ]]; then
		{ cat -- "$env_tmp" >"$env_file" && chmod 0600 -- "$env_file"; } 2>/dev/null ||
			fail 1 "cannot write the bind-mounted env file $env_file in place"
		printf '%s: refreshed in place (bind-mounted env file), %s\n' "$PROG" "$summary"
		exit 0
	fi
	fail 1 "cannot rename over the env file $env_file: ${mv_err##*: }"
fi
env_tmp=''
# The rename is durable only once the folder's entry is on disk.
sync -- "$env_dir" 2>/dev/null || true
printf '%s: refreshed, %s\n' "$PROG" "$summary"
