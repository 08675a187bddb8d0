"""kernelhub hub: the gRPC coordination service trainers connect to."""

import importlib.metadata

__version__ = importlib.metadata.version("kernelhub")  # pyproject.toml is the one source
