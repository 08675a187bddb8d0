"""The resolved configuration a running hub reads (`config.port`, `config.limits...`), built
from the settings model (`settings.py`), which owns every default, bound and help text."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from . import settings as _settings
from .collaboration import Policy
from .settings import DEFAULTS as _D
from .settings import HubSettings
from .validation import Limits


@dataclass
class HubConfig:
    """What the hub reads. Defaults are the model's; build from sources with `from_settings`
    (or `from_env`); tests construct and `replace` it directly. Help for each knob: settings.py."""

    host: str = _D.host
    port: int = _D.port
    database_url: str = _D.database_url
    training_sync_interval: float = _D.training_sync_interval
    max_inflight_per_stream: int = _D.max_inflight_per_stream
    outbound_queue_size: int = _D.outbound_queue_size
    max_events_per_response: int = _D.max_events_per_response
    stream_linger: float = _D.stream_linger
    presence_linger: float = _D.presence_linger
    lingers_follow_load: bool = _D.lingers_follow_load
    presence_writes_per_second: float = _D.presence_writes_per_second
    replay_page_size: int = _D.replay_page_size
    replay_scan_seqs: int = _D.replay_scan_seqs
    max_watch_streams: int = _D.max_watch_streams
    commit_batch_size: int = _D.commit_batch_size
    commit_batch_bytes: int = _D.commit_batch_bytes
    commit_pipeline_depth: int = _D.commit_pipeline_depth
    commit_queue_size: int = _D.commit_queue_size
    commit_linger: float = _D.commit_linger
    hello_timeout: float = _D.hello_timeout
    handshake_timeout: float = _D.handshake_timeout
    sqlite_busy_timeout: float = _D.sqlite_busy_timeout
    writer: str = _D.writer
    auto_upgrade: bool = _D.auto_upgrade
    commit_timeout: float = _D.commit_timeout
    replica: bool = _D.replica
    replica_catch_up_interval: float = _D.replica_catch_up_interval
    replica_lock_idle_timeout: float = _D.replica_lock_idle_timeout
    replica_lease: float = _D.replica_lease
    reaper_interval: float = _D.reaper_interval
    shutdown_grace: float = _D.shutdown_grace
    metrics_port: int | None = _D.metrics_port
    workers: int = _D.workers
    worker_max_restarts: int = _D.worker_max_restarts
    max_message_bytes: int = _D.max_message_bytes
    keepalive_time: float = _D.keepalive_time
    keepalive_timeout: float = _D.keepalive_timeout
    min_client_ping_interval: float = _D.min_client_ping_interval
    rate_limit_per_second: float = _D.rate_limit_per_second
    rate_limit_burst: int = _D.rate_limit_burst
    connect_rate_per_second: float = _D.connect_rate_per_second
    connect_burst: int = _D.connect_burst
    max_connections: int = _D.max_connections
    token_recheck_interval: float = _D.token_recheck_interval
    tls_cert: str = _D.tls_cert
    tls_key: str = _D.tls_key
    tls_client_ca: str = _D.tls_client_ca
    event_retention: float = _D.event_retention
    event_retention_max_events: int = _D.event_retention_max_events
    retention_max_reader_lag: int = _D.retention_max_reader_lag
    ledger_retention: float = _D.ledger_retention
    retention_interval: float = _D.retention_interval
    retention_batch_size: int = _D.retention_batch_size
    validation_lease_ttl: float = _D.validation_lease_ttl
    validation_max_attempts: int = _D.validation_max_attempts
    validation_max_wait: float = _D.validation_max_wait
    validation_max_leases: int = _D.validation_max_leases
    limits: Limits = field(default_factory=Limits)
    policy: Policy = field(default_factory=Policy)

    @staticmethod
    def sqlite_url(path: str | Path) -> str:
        return _settings.sqlite_url(path)

    @classmethod
    def from_settings(cls, settings: HubSettings) -> HubConfig:
        """The hub's view of the model: top-level knobs, and `limits`/`policy` as the domain's
        own objects (durations as timedelta)."""
        own = {f.name for f in dataclasses.fields(cls)} - {"limits", "policy"}
        policy = {f.name: getattr(settings, f.name) for f in dataclasses.fields(Policy)}
        for name, value in policy.items():
            if isinstance(getattr(Policy, name), timedelta):
                policy[name] = timedelta(seconds=value)
        return cls(
            **{name: getattr(settings, name) for name in own},
            limits=Limits(
                **{f.name: getattr(settings, f.name) for f in dataclasses.fields(Limits)}
            ),
            policy=Policy(**policy),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> HubConfig:
        """Defaults overridden by KERNELHUB_<NAME> variables (and KERNELHUB_DB, a SQLite path);
        a bad value raises settings.SettingsError (a ValueError) naming the variable."""
        return cls.from_settings(_settings.load_settings(environ).settings)
