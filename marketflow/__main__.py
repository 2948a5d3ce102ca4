from marketflow.cli import main

raise SystemExit(main())
