from waggle_trainer.cli import main

raise SystemExit(main())
