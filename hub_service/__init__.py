"""kernelhub hub: the gRPC coordination service trainers connect to."""

__version__ = "0.1.0"
