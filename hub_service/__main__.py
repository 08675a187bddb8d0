"""`python -m hub_service` is `kernelhub-hub`."""

import sys

from .cli import main

sys.exit(main())
