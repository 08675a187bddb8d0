"""kernelhub-dashboard: a live web page of one hub, a client of it over gRPC (an observer token).

It watches the hub's events (Watch) and polls its stats and agents, aggregates them in this
process within fixed bounds, and serves the browser a few snapshots a second over
server-sent events. It imports only the generated contract, never the hub.
"""
