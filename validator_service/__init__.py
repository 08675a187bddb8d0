"""kernelhub-validator: takes shared components from the hub, builds and tests them in a
sandbox, and reports each verdict. A client of the hub's contract only (generated code)."""

from __future__ import annotations

__version__ = "0.1.0"
