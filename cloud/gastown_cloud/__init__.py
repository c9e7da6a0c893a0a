"""The development cloud of Gas Town sandboxes: tokens, towns, refresh, gateway, usage.

`gastown-cloud serve` runs it; the token functions are importable without the server.
"""

from __future__ import annotations

from .errors import CloudError, TokenInvalid
from .tokens import GastownClaims, fingerprint, mint_gastown_token, verify_gastown_token

__all__ = [
    "CloudError",
    "GastownClaims",
    "TokenInvalid",
    "fingerprint",
    "mint_gastown_token",
    "verify_gastown_token",
]
