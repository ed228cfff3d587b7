from hyperface.cli import main

raise SystemExit(main())
