from loopserve.cli.command import main

raise SystemExit(main())
