from gastown_sandboxd.cli import main

raise SystemExit(main())
