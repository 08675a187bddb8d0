"""The hub's one settings model, and where each value comes from: flag > env > TOML file > default.

Every knob is declared once here, with its type, bounds, group and help text; the environment
variables (`KERNELHUB_<NAME>`), the `serve` flags (`--<name>`), the `--config` TOML file, the
README's configuration table and `kernelhub-hub config show` all derive from it. Domain limits
keep their defaults where their rules live (`validation.Limits`, `collaboration.Policy`).
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from .collaboration import Policy
from .durations import parse_duration
from .state import REPLAY_SCAN_SEQS
from .validation import Limits

ENV_PREFIX = "KERNELHUB_"
# Group names, in the order `config show` and the README list them; also TOML table names.
GROUPS = (
    "server",
    "tls",
    "database",
    "streams",
    "rate_limits",
    "limits",
    "collaboration",
    "retention",
    "validation",
    "logging",
)


def _seconds(value: object) -> object:
    """Durations read as 30s, 5m, 1h30m, 250ms or plain seconds, from any source."""
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except argparse.ArgumentTypeError as error:
            raise ValueError(str(error)) from None
    return value


Seconds = Annotated[float, BeforeValidator(_seconds)]
# A resend within a minute (HubClient reconnects and resends for 60 s) must stay a duplicate.
MIN_LEDGER_RETENTION = 60.0


def _ledger_window(value: float) -> float:
    if 0 < value < MIN_LEDGER_RETENTION:
        raise ValueError(
            f"must be 0 (keep forever) or at least {MIN_LEDGER_RETENTION:g} s, so a resend "
            "after a reconnect is still recognised"
        )
    return value


_LIMITS, _POLICY = Limits(), Policy()


def _setting(default: Any, group: str, doc: str, **bounds: Any) -> Any:
    """A field with its group (README table, TOML table) and its help text."""
    assert group in GROUPS, group
    return Field(default, description=doc, json_schema_extra={"group": group}, **bounds)


class HubSettings(BaseSettings):
    """Every setting of a hub. Build one with `load_settings`, which also says each one's source."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False, frozen=True
    )

    # server
    host: str = _setting("0.0.0.0", "server", "interface to bind")
    port: int = _setting(50051, "server", "port to listen on (0 picks a free one)", ge=0, le=65535)
    max_connections: int = _setting(
        10000, "server", "live Connect streams the hub carries at once", gt=0
    )
    hello_timeout: Seconds = _setting(
        10.0, "server", "seconds a new stream has to send its Hello", gt=0
    )
    handshake_timeout: Seconds = _setting(
        10.0,
        "server",
        "seconds a TCP connection has to finish its handshake (TLS, the HTTP/2 preface and "
        "settings) before it is closed, so idle sockets cannot pile up",
        gt=0,
    )
    max_message_bytes: int = _setting(
        4 * 1024 * 1024, "server", "largest gRPC message received or sent, in bytes", gt=0
    )
    keepalive_time: Seconds = _setting(30.0, "server", "seconds between keepalive pings", gt=0)
    keepalive_timeout: Seconds = _setting(
        10.0, "server", "seconds a keepalive ping's answer may take", gt=0
    )
    min_client_ping_interval: Seconds = _setting(
        5.0,
        "server",
        "client pings (without data) more often than this count as abuse; 2 strikes close the "
        "connection",
        ge=0,
    )
    token_recheck_interval: Seconds = _setting(
        2.0,
        "server",
        "seconds between re-checks of live streams' tokens (revocation, expiry)",
        gt=0,
    )
    reaper_interval: Seconds = _setting(
        1.0,
        "server",
        "seconds between commits that expire overdue sessions; while the database is down this "
        "commit is also the probe that turns health SERVING again",
        gt=0,
    )
    shutdown_grace: Seconds = _setting(
        5.0, "server", "seconds a stopping hub waits for streams to drain", ge=0
    )
    metrics_port: int | None = _setting(
        None,
        "server",
        "port of the Prometheus `/metrics` endpoint, on the same interface (unset: none is "
        "served; 0 picks a free one); with `workers` N, worker i serves its own on this port + i",
        ge=0,
        le=65535,
    )
    workers: int = _setting(
        1,
        "server",
        "hub processes sharing the one port (SO_REUSEPORT), each a replica (`replica`) on the "
        "one PostgreSQL database, started and restarted by a supervising parent "
        "(docs/scaling.md); 1: this process is the hub, alone on its port",
        ge=1,
        le=256,
    )
    worker_max_restarts: int = _setting(
        5,
        "server",
        "restarts of one worker within a minute after which the supervisor stops every worker "
        "and exits non-zero rather than restart it forever (0: the first death ends the hub)",
        ge=0,
    )

    # tls
    tls_cert: str = _setting("", "tls", "server certificate, a PEM file (enables TLS)")
    tls_key: str = _setting("", "tls", "server private key, a PEM file")
    tls_client_ca: str = _setting(
        "", "tls", "CA that signs client certificates, a PEM file (enables mutual TLS)"
    )

    # database and writer
    database_url: str = _setting(
        "sqlite:///kernelhub.db",
        "database",
        "any SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (`KERNELHUB_DB` or `--db` "
        "give a SQLite file instead)",
        min_length=1,
    )
    sqlite_busy_timeout: Seconds = _setting(
        5.0, "database", "seconds SQLite waits for another writer's lock before UNAVAILABLE", ge=0
    )
    writer: Literal["process", "thread"] = _setting(
        "process",
        "database",
        "where group commits run: `process` (a child process, so SQLite and SQLAlchemy neither "
        "hold nor wait for the event loop's GIL) or `thread` (in the hub's process)",
    )
    auto_upgrade: bool = _setting(
        True,
        "database",
        "at start, upgrade the database's schema to this hub's; off: an older schema is refused "
        "until `kernelhub-hub db upgrade` (a newer one is refused either way)",
    )
    commit_timeout: Seconds = _setting(
        30.0,
        "database",
        "seconds the writer has to answer a commit, else it is answered UNAVAILABLE (retry with "
        "the same `message_id`) and the writer process is replaced",
        gt=0,
    )
    replica: bool = _setting(
        False,
        "database",
        "one of several replicas of this hub on one PostgreSQL database (`database_url`): seq is "
        "allocated under the log's advisory lock, and live events come from the shared log "
        "(LISTEN/NOTIFY, and a catch-up read every `replica_catch_up_interval`) "
        "(docs/scaling.md); refused for SQLite and `memory://`",
    )
    replica_catch_up_interval: Seconds = _setting(
        0.5,
        "database",
        "a replica reads the shared log at least this often, whatever notifications it got, so "
        "a lost one costs latency, never an event",
        gt=0,
    )
    replica_lock_idle_timeout: Seconds = _setting(
        10.0,
        "database",
        "PostgreSQL ends a replica's commit that holds the log's lock and sends nothing for this "
        "long (its host vanished mid-commit), so it cannot stall the other replicas; it rolls "
        "back, unanswered",
        gt=0,
    )
    replica_lease: Seconds = _setting(
        10.0,
        "database",
        "each replica holds a lease in the database, renewed every third of this: a replica "
        "silent for longer (killed, paused, cut off) has its agents marked offline by another "
        "replica, and one that comes back ends its streams (they reconnect); the leader lease "
        "(deadline expiry, retention, offline marking) moves to another replica as fast",
        gt=0,
    )
    commit_batch_size: int = _setting(512, "database", "commands at most per group commit", gt=0)
    commit_batch_bytes: int = _setting(
        4 * 1024 * 1024,
        "database",
        "bytes of messages at most per group commit (the first command always goes), so one "
        "transaction, and its trip to the writer, stays short",
        gt=0,
    )
    commit_pipeline_depth: int = _setting(
        2,
        "database",
        "group commits sent to the writer at once: the next goes while one commits, so the "
        "writer starts it the moment it has answered (1: one at a time)",
        ge=1,
        le=8,
    )
    commit_queue_size: int = _setting(
        8192, "database", "commands waiting for a group commit; enqueueing waits beyond", gt=0
    )
    commit_linger: Seconds = _setting(
        0.002,
        "database",
        "while busy, at most one group commit per this many seconds, so commands share commits "
        "(an idle hub commits at once; 0 commits whatever waits at once; the longest it gets "
        "while lingers_follow_load is on)",
        ge=0,
    )

    # streams
    training_sync_interval: Seconds = _setting(
        30.0, "streams", "seconds between training syncs to every agent (0: only on connect)", ge=0
    )
    max_inflight_per_stream: int = _setting(
        256, "streams", "a stream's messages awaiting their receipt; reading pauses beyond", gt=0
    )
    outbound_queue_size: int = _setting(
        1024,
        "streams",
        "live events queued per connection before it falls back to reading the log",
        gt=0,
    )
    max_events_per_response: int = _setting(
        64, "streams", "events at most in one response on a stream", gt=0
    )
    stream_linger: Seconds = _setting(
        0.005,
        "streams",
        "a busy stream is written at most once per this many seconds, so events coalesce (an "
        "idle stream's first event goes at once; 0 writes whatever waits at once; the longest it "
        "gets while lingers_follow_load is on)",
        ge=0,
    )
    lingers_follow_load: bool = _setting(
        True,
        "streams",
        "stream_linger and commit_linger apply in proportion to the hub's load (its "
        "process's CPU and how late its event loop runs; for commit_linger also the time "
        "spent committing): not at all below 0.5 busy seconds per second, in full from 0.8, "
        "so a lightly loaded hub answers at once and a busy one batches (false: they always "
        "apply in full; kernelhub_linger_factor shows the factor)",
    )
    presence_linger: Seconds = _setting(
        0.25,
        "streams",
        "a stream's presence changes (joins, leaves) wait at most this many seconds after the "
        "first of them, so a burst of joins costs each agent one write, not one per join",
        ge=0,
    )
    presence_writes_per_second: float = _setting(
        2000.0,
        "streams",
        "presence updates the hub writes per second at most, over all its streams: with more "
        "agents online than this times `presence_linger`, updates coalesce for longer (each "
        "agent still learns of each change once), so a storm of joins cannot starve the hub; "
        "while the hub is busy (lingers_follow_load), they wait until it is not, up to five "
        "times as long",
        gt=0,
    )
    replay_page_size: int = _setting(
        512, "streams", "events read from the log per page while replaying", gt=0
    )
    replay_scan_seqs: int = _setting(
        REPLAY_SCAN_SEQS,
        "streams",
        "seqs of the log one read of an agent stream's replay looks at, at most: a read whose "
        "filter matches little stops there and the next goes on from it, so no replay holds "
        "a reader thread for long",
        gt=0,
        le=1 << 40,
    )
    max_watch_streams: int = _setting(
        64,
        "streams",
        "live Watch streams (observers, dashboards) the hub carries at once; each sees every "
        "event, so they cost more than an agent's stream",
        gt=0,
    )

    # rate limits
    rate_limit_per_second: float = _setting(
        5000.0, "rate_limits", "per-agent message rate, a token bucket (0 disables)", ge=0
    )
    rate_limit_burst: int = _setting(10000, "rate_limits", "per-agent message burst", gt=0)
    connect_rate_per_second: float = _setting(
        2.0,
        "rate_limits",
        "per-agent Connects per second, a token bucket (0 disables); beyond it "
        "RESOURCE_EXHAUSTED saying when to retry",
        ge=0,
    )
    connect_burst: int = _setting(100, "rate_limits", "per-agent Connect burst", gt=0)

    # limits (validation.Limits): each crossing is INVALID_ARGUMENT naming the field and limit
    max_id_length: int = _setting(
        _LIMITS.max_id_length, "limits", "characters in an id (agents, messages, ...)", gt=0
    )
    max_name_length: int = _setting(_LIMITS.max_name_length, "limits", "characters in a name", gt=0)
    max_text_length: int = _setting(
        _LIMITS.max_text_length, "limits", "characters in a free text field", gt=0
    )
    max_code_bytes: int = _setting(
        _LIMITS.max_code_bytes, "limits", "bytes of code in one component", gt=0
    )
    max_list_items: int = _setting(_LIMITS.max_list_items, "limits", "items in a list field", gt=0)
    max_attributes: int = _setting(
        _LIMITS.max_attributes, "limits", "entries in an attributes map", gt=0
    )
    max_attribute_value_length: int = _setting(
        _LIMITS.max_attribute_value_length, "limits", "characters in an attribute value", gt=0
    )
    max_batch_requests: int = _setting(
        _LIMITS.max_batch_requests, "limits", "requests in one batch", gt=0
    )

    # collaboration (collaboration.Policy)
    proposal_ttl: Seconds = _setting(
        _POLICY.proposal_ttl.total_seconds(),
        "collaboration",
        "seconds a PROPOSED collaboration has to be answered",
        gt=0,
    )
    activity_ttl: Seconds = _setting(
        _POLICY.activity_ttl.total_seconds(),
        "collaboration",
        "seconds an ACTIVE collaboration may go without progress",
        gt=0,
    )
    partner_offline_grace: Seconds = _setting(
        _POLICY.partner_offline_grace.total_seconds(),
        "collaboration",
        "seconds a collaboration outlives a partner's disconnect",
        ge=0,
    )
    max_open_per_agent: int = _setting(
        _POLICY.max_open_per_agent,
        "collaboration",
        "sessions an agent has taken on (proposed and not ended, or accepted)",
        gt=0,
    )
    max_open_per_pair: int = _setting(
        _POLICY.max_open_per_pair,
        "collaboration",
        "open sessions between the same two agents",
        gt=0,
    )
    max_incoming_proposals: int = _setting(
        _POLICY.max_incoming_proposals,
        "collaboration",
        "unanswered proposals to one agent, from anyone",
        gt=0,
    )
    max_deliveries_per_request: int = _setting(
        _POLICY.max_deliveries_per_request,
        "collaboration",
        "agents one feature request is delivered to",
        gt=0,
    )

    # retention (retention.py): the event log, its recipients and the idempotency ledger;
    # artifacts, collaborations and feature requests are never pruned
    event_retention: Seconds = _setting(
        7 * 86400.0,
        "retention",
        "seconds the event log keeps an event (0: forever); a resume from an older seq is "
        "OUT_OF_RANGE (events a connected trainer has not yet received are always kept)",
        ge=0,
    )
    event_retention_max_events: int = _setting(
        10_000_000,
        "retention",
        "events the log keeps at most, the oldest pruned first (0: no limit)",
        ge=0,
    )
    retention_max_reader_lag: int = _setting(
        1_000_000,
        "retention",
        "a connected trainer still reading the log this many events behind the head, while "
        "it holds pruning back, is ended with RESOURCE_EXHAUSTED (0: never), so one slow "
        "reader cannot keep the log growing",
        ge=0,
    )
    ledger_retention: Annotated[Seconds, AfterValidator(_ledger_window)] = _setting(
        7 * 86400.0,
        "retention",
        "seconds a message_id is remembered (0: forever, else at least 60): a resend older "
        "than this is treated as a new message",
        ge=0,
    )
    retention_interval: Seconds = _setting(
        60.0, "retention", "seconds between pruning rounds", gt=0
    )
    retention_batch_size: int = _setting(
        5000,
        "retention",
        "rows at most per pruning transaction, so no prune holds the writer for long",
        gt=0,
        le=100_000,
    )
    # validation (the validators' queue: verdicts.py)
    validation_lease_ttl: Seconds = _setting(
        120.0,
        "validation",
        "seconds a validator holds a component it claimed; a verdict after that is refused "
        "and the component goes to the next validator",
        gt=0,
    )
    validation_max_attempts: int = _setting(
        3,
        "validation",
        "leases a component gets; when every one expires the hub records an ERROR verdict",
        gt=0,
    )
    validation_max_leases: int = _setting(
        4,
        "validation",
        "unexpired leases one validator may hold at once (a claim beyond: RESOURCE_EXHAUSTED)",
        gt=0,
    )
    validation_max_wait: Seconds = _setting(
        30.0,
        "validation",
        "seconds a ClaimValidation may wait for a component (its `wait_seconds` at most)",
        ge=0,
    )

    # logging
    log_level: Annotated[
        Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"],
        # Any case; WARN and FATAL as logging itself takes them.
        BeforeValidator(
            lambda v: (
                {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(v.upper(), v.upper())
                if isinstance(v, str)
                else v
            )
        ),
    ] = _setting("INFO", "logging", "log level (given before the command: `--log-level` first)")


DEFAULTS = HubSettings.model_construct()  # the defaults alone, no source read
# Settings in seconds, that also take 30s, 5m, 1h30m forms.
DURATIONS = frozenset(
    name
    for name, field in HubSettings.model_fields.items()
    if any(isinstance(m, BeforeValidator) and m.func is _seconds for m in field.metadata)
)


# Flags kept from before the model, beside the derived `--<name>`.
FLAG_ALIASES = {"rate_limit_per_second": ("--rate-limit",)}


def env_name(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def group_of(name: str) -> str:
    extra = HubSettings.model_fields[name].json_schema_extra
    assert isinstance(extra, dict)
    return str(extra["group"])


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path)}"


def mask_url(url: str) -> str:
    """The database URL without its password, for logs and `config show`."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{host}"
    return url


class SettingsError(ValueError):
    """A setting that cannot be used: the message names it, its source and what is wrong."""


@dataclass(frozen=True)
class Resolved:
    """The effective settings and, for each, where its value came from."""

    settings: HubSettings
    origins: dict[str, str]  # name -> "default", "file hub.toml", "env KERNELHUB_X", "flag --x"


class _Environ(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping (tests pass their own)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(HubSettings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


def _from_file(path: Path) -> dict[str, Any]:
    """A TOML file's settings: top-level keys, or keys inside a table named for their group."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise SettingsError(f"--config {path}: cannot read it: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SettingsError(f"--config {path}: not valid TOML: {error}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in GROUPS and isinstance(value, dict):
            values.update(value)
        else:
            values[key] = value
    return values


def _check(values: dict[str, Any], source: str, label: Mapping[str, str]) -> None:
    """Validate one source's values alone, so an error names the setting and that source."""
    try:
        HubSettings.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        where = label.get(name, name)
        if first["type"] == "extra_forbidden":
            raise SettingsError(f"{source}: unknown setting {name!r}") from None
        raise SettingsError(f"{where}={values.get(name)!r} ({source}): {first['msg']}") from None


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    flag_labels: Mapping[str, str] | None = None,
) -> Resolved:
    """Flags over environment over the TOML file over defaults; each source checked alone.
    `flag_labels`: the flag a setting was given as, where not its own (`--db`)."""
    layers: list[tuple[str, dict[str, Any], dict[str, str]]] = []
    if config_file is not None:
        values = _from_file(config_file)
        layers.append((f"file {config_file}", values, {}))
    if environ is not None:
        env_values = _Environ(environ)()
        labels = {name: env_name(name) for name in env_values}
        if "database_url" not in env_values and environ.get(f"{ENV_PREFIX}DB"):
            env_values["database_url"] = sqlite_url(environ[f"{ENV_PREFIX}DB"])
            labels["database_url"] = f"{ENV_PREFIX}DB"
        layers.append(("env", env_values, labels))
    if flags:
        labels = {name: flag_name(name) for name in flags} | dict(flag_labels or {})
        layers.append(("flag", dict(flags), labels))
    merged: dict[str, Any] = {}
    origins = dict.fromkeys(HubSettings.model_fields, "default")
    for source, values, labels in layers:
        _check(values, source, labels)
        merged.update(values)
        for name in values:
            origins[name] = f"{source} {labels[name]}" if name in labels else source
    return Resolved(HubSettings.model_validate(merged), origins)
