"""`python -m gastown_sandboxd.agents exec|token …`: the light entry shims and the helper use.

It ends without the interpreter's tear-down (`_lazy.exit_without_teardown`): nothing here
needs it, no atexit handler, no file open but the standard streams. Errors and `SystemExit`
(usage, `--help`) still end the usual way.
"""

from gastown_sandboxd._lazy import exit_without_teardown
from gastown_sandboxd.agents.exec import main

exit_without_teardown(main())
