from loopserve.cli import main

raise SystemExit(main())
