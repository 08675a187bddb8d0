"""The kernelhub trainer: simulated AI agents that build pieces of an operating
system and coordinate through the hub over gRPC."""

__version__ = "1.0.0"
