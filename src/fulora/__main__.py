from fulora.cli import main

raise SystemExit(main())
