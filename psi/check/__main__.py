from psi.check.cli import main

raise SystemExit(main())
