"""The gateway token: its rules, its schedule, its file, and the component that keeps it.

Pure rules first: `claims.py` (the claims, acceptability, fingerprints), `schedule.py` (the next
wake) and `envfile.py` (the `KEY=VALUE` file); then `cloud.py` (the refresh call) and
`refresher.py` (the `TokenRefresher` component).

The face loads its modules on first use: the agents' light entry reads claims and the env file
on every agent start, and must not pay for httpx and the refresher it does not run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gastown_sandboxd._lazy import lazy_names

if TYPE_CHECKING:
    from gastown_sandboxd.token.claims import (
        TOKEN_TYPE,
        acceptability_reasons,
        decode_unverified,
        fingerprint,
    )
    from gastown_sandboxd.token.cloud import CloudClient
    from gastown_sandboxd.token.envfile import TOKEN_KEY, read_env_values, read_token
    from gastown_sandboxd.token.refresher import LastError, TokenRefresher, token_metrics
    from gastown_sandboxd.token.schedule import SchedulePolicy

__all__ = [
    "TOKEN_KEY",
    "TOKEN_TYPE",
    "CloudClient",
    "LastError",
    "SchedulePolicy",
    "TokenRefresher",
    "acceptability_reasons",
    "decode_unverified",
    "fingerprint",
    "read_env_values",
    "read_token",
    "token_metrics",
]

_WHERE = {
    "TOKEN_KEY": "envfile",
    "TOKEN_TYPE": "claims",
    "CloudClient": "cloud",
    "LastError": "refresher",
    "SchedulePolicy": "schedule",
    "TokenRefresher": "refresher",
    "acceptability_reasons": "claims",
    "decode_unverified": "claims",
    "fingerprint": "claims",
    "read_env_values": "envfile",
    "read_token": "envfile",
    "token_metrics": "refresher",
}


__getattr__ = lazy_names(__name__, _WHERE)
