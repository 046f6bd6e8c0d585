from stp_fast.cli import main

raise SystemExit(main())
