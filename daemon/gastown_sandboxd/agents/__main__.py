"""`python -m gastown_sandboxd.agents exec|token …`: the light entry shims and the helper use."""

import sys

from gastown_sandboxd.agents.exec import main

sys.exit(main())
