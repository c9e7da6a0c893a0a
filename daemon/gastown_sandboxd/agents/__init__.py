"""How agents get the token (CONTRACT §5): shims, `exec`, `token`, Claude Code's helper.

The face loads its modules on first use: every agent start imports this package, and must not
pay for the daemon-side parts (structlog, anyio) it does not run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gastown_sandboxd._lazy import lazy_names

if TYPE_CHECKING:
    from gastown_sandboxd.agents.exec import (
        EXEC_COMMAND_HELP,
        PRINT_COMMAND_HELP,
        add_common_arguments,
        add_exec_arguments,
        help_formatter,
        run_exec,
        run_token,
    )
    from gastown_sandboxd.agents.keeper import AgentKeeper

__all__ = [
    "EXEC_COMMAND_HELP",
    "PRINT_COMMAND_HELP",
    "AgentKeeper",
    "add_common_arguments",
    "add_exec_arguments",
    "help_formatter",
    "run_exec",
    "run_token",
]

_WHERE = {
    "EXEC_COMMAND_HELP": "exec",
    "PRINT_COMMAND_HELP": "exec",
    "AgentKeeper": "keeper",
    "add_common_arguments": "exec",
    "add_exec_arguments": "exec",
    "help_formatter": "exec",
    "run_exec": "exec",
    "run_token": "exec",
}


__getattr__ = lazy_names(__name__, _WHERE)
