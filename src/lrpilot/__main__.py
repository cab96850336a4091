from lrpilot.cli import main

raise SystemExit(main())
