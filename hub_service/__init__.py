"""kernelhub hub: the gRPC coordination service trainers connect to."""

import importlib.metadata
import os

# gRPC >= 1.81 can abort a child forked while its poller runs (grpc/grpc#43055: the child's
# restarted poller finds its epoll fd closed by close_fds and aborts before exec; seen as a
# hub subprocess dying with SIGABRT at start). Nothing here uses gRPC in a forked child
# without exec, so its fork support is off unless the environment says otherwise.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = importlib.metadata.version("kernelhub")  # pyproject.toml is the one source
