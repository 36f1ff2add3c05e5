from djepa.cli import main

raise SystemExit(main())
