from broker.nats.cli import main

raise SystemExit(main())
