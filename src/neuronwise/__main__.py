from neuronwise.experiment.cli import main

raise SystemExit(main())
