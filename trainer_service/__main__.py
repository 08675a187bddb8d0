"""`python -m trainer_service` is `kernelhub-trainer`."""

from trainer_service.cli import main

raise SystemExit(main())
