from kvpolicies.cli import main

raise SystemExit(main())
