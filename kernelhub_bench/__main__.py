"""`python -m kernelhub_bench` is `kernelhub-bench`."""

import sys

from .cli import main

sys.exit(main())
