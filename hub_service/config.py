"""Hub settings: defaults, overridden by KERNELHUB_* environment variables, then by flags."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from .collaboration import Policy
from .validation import Limits

DEFAULT_PORT = 50051


def _switch(raw: str) -> bool:
    """An on/off environment variable (bool("false") would be True)."""
    value = {"1": True, "true": True, "yes": True, "on": True}.get(raw.strip().lower())
    if value is None and raw.strip().lower() not in ("0", "false", "no", "off"):
        raise ValueError(raw)
    return bool(value)


@dataclass
class HubConfig:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    database_url: str = "sqlite:///kernelhub.db"
    # Seconds between training syncs to every agent (0: only on connect).
    training_sync_interval: float = 30.0
    # A stream's messages awaiting their receipt; reading pauses beyond this.
    max_inflight_per_stream: int = 256
    # Live events queued per connection before it falls back to reading the log.
    outbound_queue_size: int = 1024
    max_events_per_response: int = 64
    # A busy stream is written at most once per this many seconds, so events coalesce
    # under load; an idle stream's first event goes out at once.
    stream_linger: float = 0.005
    replay_page_size: int = 512
    commit_batch_size: int = 512
    # A group commit also ends at this many bytes of messages (the first always goes).
    commit_batch_bytes: int = 4 * 1024 * 1024
    commit_queue_size: int = 8192
    # While busy, at most one group commit per this many seconds, so commands share
    # commits under moderate load; an idle hub commits a command at once.
    commit_linger: float = 0.002
    hello_timeout: float = 10.0
    # A TCP connection must finish its handshake (TLS, and the HTTP/2 preface and settings)
    # within this many seconds or is closed: idle sockets cannot pile up (gRPC's default: 120 s).
    handshake_timeout: float = 10.0
    # How long SQLite waits for another writer's lock before the commit fails (UNAVAILABLE).
    sqlite_busy_timeout: float = 5.0
    # Where group commits run: "process" (a child process, so SQLite and SQLAlchemy work
    # neither holds nor waits for the event loop's GIL) or "thread" (in the hub's process).
    writer: str = "process"
    # A commit not answered within this many seconds is answered UNAVAILABLE (the writer
    # process is then replaced).
    commit_timeout: float = 30.0
    reaper_interval: float = 1.0
    shutdown_grace: float = 5.0
    max_message_bytes: int = 4 * 1024 * 1024
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    # Pings more often than this (without data) count as abuse; 2 strikes close the connection.
    min_client_ping_interval: float = 5.0
    # Per-agent message rate (token bucket); 0 disables.
    rate_limit_per_second: float = 5000.0
    rate_limit_burst: int = 10000
    # Live Connect streams the hub carries at once.
    max_connections: int = 10000
    # How often live streams' tokens are re-checked (revocation, expiry).
    token_recheck_interval: float = 2.0
    # TLS: server certificate and key (PEM files); a client CA turns on mutual TLS.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # At start, bring the database's schema to this hub's (else an older one is refused,
    # naming `kernelhub-hub db upgrade`). A newer one is refused either way.
    auto_upgrade: bool = True
    limits: Limits = field(default_factory=Limits)
    policy: Policy = field(default_factory=Policy)

    @staticmethod
    def sqlite_url(path: str | Path) -> str:
        return f"sqlite:///{Path(path)}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> HubConfig:
        """Defaults overridden by KERNELHUB_HOST, KERNELHUB_PORT, KERNELHUB_DATABASE_URL,
        KERNELHUB_DB (a SQLite path), KERNELHUB_TRAINING_SYNC_INTERVAL and, for any other
        top-level setting, KERNELHUB_<NAME>."""
        config = cls()
        for f in dataclasses.fields(cls):
            raw = environ.get(f"KERNELHUB_{f.name.upper()}")
            if raw is None or f.name in ("limits", "policy"):
                continue
            kind = type(getattr(config, f.name))
            try:
                setattr(config, f.name, _switch(raw) if kind is bool else kind(raw))
            except ValueError:
                raise ValueError(
                    f"KERNELHUB_{f.name.upper()}={raw!r} is not a valid {kind.__name__}"
                ) from None
        if "KERNELHUB_DB" in environ and "KERNELHUB_DATABASE_URL" not in environ:
            config.database_url = cls.sqlite_url(environ["KERNELHUB_DB"])
        grace = environ.get("KERNELHUB_PARTNER_OFFLINE_GRACE")
        if grace:
            config.policy = dataclasses.replace(
                config.policy, partner_offline_grace=timedelta(seconds=float(grace))
            )
        return config
