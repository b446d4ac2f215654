from everest_agent.cli import main

raise SystemExit(main())
