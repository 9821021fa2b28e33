from broker.accounts.cli import main

raise SystemExit(main())
