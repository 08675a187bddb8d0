"""`python -m dashboard_service` is `kernelhub-dashboard`."""

from .cli import main

raise SystemExit(main())
