from qfusion.cli import main

raise SystemExit(main())
