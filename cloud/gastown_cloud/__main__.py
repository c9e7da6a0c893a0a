"""`python -m gastown_cloud serve …`."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
