"""Plausible, compilable C99 for what the simulated trainers share.

Every unit is self-contained (its own includes, no `main`) and exposes an
`int <entry_point>(void)` self-test returning 0 when the code does what it
claims, so tests can compile *and* run it. Sizes, names and small design
choices come from the caller's `random.Random`: the same seed gives the same
source, different seeds give different but equally valid code.

The C lives in `codegen_templates/*.c` (package data), one file per component,
each valid C99 as it stands so it reads, diffs and compiles as C. Above its
`_BODY_MARKER` line a template has its `#include`s (the unit's includes) and an
`#ifndef NAME / #define NAME default / #endif` per parameter (the parameters).
The renderer keeps only the body, keeps or drops each `#if FLAG ... [#else ...]
#endif` block on a boolean parameter (bodies have no other conditionals), writes
the values over the other parameters' names, then the unit's prefix over
`prefix_` and `PREFIX_`. This module is the registry: which template makes
which component, and how the rng picks its parameters.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Final

from generated.kernelhub.v1 import hub_pb2 as pb
from trainer_service.simulation.capabilities import Specialization, specialization_name

TEMPLATE_DIR: Final = "codegen_templates"  # package data of trainer_service.simulation
_BODY_MARKER: Final = "/* ---- template body ---- */\n"
_INCLUDE: Final = re.compile(r"^#include <([^>]+)>$", re.M)
_PARAM: Final = re.compile(r"^#ifndef (\w+)\n#define \1 ", re.M)
# One level only: a template's flag blocks do not nest.
_FLAG_BLOCK: Final = re.compile(r"^#if (\w+)\n(.*?)(?:^#else\n(.*?))?^#endif\n", re.M | re.S)
_DIRECTIVE_LEFT: Final = re.compile(r"^#(?:if|ifdef|ifndef|elif|else|endif)\b", re.M)


@dataclass(frozen=True)
class GeneratedCode:
    """One C translation unit and what a component record needs to describe it."""

    name: str
    code: str
    entry_point: str
    test_cases: tuple[str, ...]
    dependencies: tuple[str, ...]


@dataclass(frozen=True)
class _Template:
    includes: frozenset[str]
    params: frozenset[str]
    body: str


@dataclass(frozen=True)
class _Variant:
    """What a maker picked: a value per template parameter (bool for a flag),
    the self-test cases those choices include, and a one-line summary."""

    values: Mapping[str, str | int | bool]
    tests: tuple[str, ...]
    summary: str


@dataclass(frozen=True)
class _Piece:
    """A fragment that can share a translation unit with others: every identifier
    it defines starts with its prefix."""

    includes: frozenset[str]
    body: str
    selftest: str
    tests: tuple[str, ...]
    summary: str


@functools.cache
def _template(name: str) -> _Template:
    """Read through importlib.resources so an installed wheel works, once per process."""
    path = resources.files("trainer_service.simulation") / TEMPLATE_DIR / f"{name}.c"
    text = path.read_text(encoding="utf-8")
    head, marker, body = text.partition(_BODY_MARKER)
    if not marker:
        raise ValueError(f"template {name}.c has no body marker {_BODY_MARKER.strip()!r}")
    return _Template(frozenset(_INCLUDE.findall(head)), frozenset(_PARAM.findall(head)), body)


def _render(name: str, prefix: str, values: Mapping[str, str | int | bool]) -> str:
    """Values before the prefix, so a value may name a prefixed identifier
    (`prefix_clear`); a mismatch with the template is a bug, so it raises."""
    template = _template(name)
    if set(values) != template.params:
        raise ValueError(
            f"template {name}.c takes {sorted(template.params)}, was given {sorted(values)}"
        )

    def flag_block(m: re.Match[str]) -> str:
        flag = values.get(m[1])
        if not isinstance(flag, bool):
            raise ValueError(f"template {name}.c: #if {m[1]} is not on a flag parameter")
        return m[2] if flag else m[3] or ""

    text = _FLAG_BLOCK.sub(flag_block, template.body)
    if _DIRECTIVE_LEFT.search(text):
        raise ValueError(f"template {name}.c: a conditional is nested or unbalanced")
    names = [k for k, v in values.items() if not isinstance(v, bool)]
    if names:
        text = re.sub(rf"\b({'|'.join(names)})\b", lambda m: str(values[m[1]]), text)
    text = re.sub(r"\bprefix_", f"{prefix}_", text)
    return re.sub(r"\bPREFIX_", f"{prefix.upper()}_", text)


def _piece(template: str, prefix: str, variant: _Variant) -> _Piece:
    return _Piece(
        includes=_template(template).includes,
        body=_render(template, prefix, variant.values),
        selftest=f"{prefix}_selftest",
        tests=variant.tests,
        summary=variant.summary,
    )


def _if(flag: bool, *tests: str) -> tuple[str, ...]:
    return tests if flag else ()


def _hex_bytes(rng: random.Random, n: int) -> str:
    return ", ".join(f"0x{rng.randrange(256):02x}" for _ in range(n))


# ---------------------------------------------------------------------------
# Makers: one per template, drawing its parameters from the rng (the order of
# the draws is part of "same seed, same code").
# ---------------------------------------------------------------------------


def _ring_buffer(rng: random.Random) -> _Variant:
    capacity = rng.choice((64, 128, 256, 512, 1024))
    copy = rng.choice(("loop", "memcpy"))
    checksum = rng.random() < 0.5
    return _Variant(
        {
            "CAPACITY": f"{capacity}u",
            "CHUNK": capacity * 3 // 4,
            "STRIDE": f"{rng.choice((3, 5, 7, 11))}u",
            "COPY_MEMCPY": copy == "memcpy",
            "WITH_CHECKSUM": checksum,
        },
        (
            "wraparound_roundtrip",
            "full_ring_rejects_overflow",
            *_if(checksum, "checksum_verifies_to_zero"),
        ),
        f"packet ring buffer, capacity={capacity}, copy={copy}, checksum={checksum}",
    )


def _bitmap_allocator(rng: random.Random) -> _Variant:
    blocks = 32 * rng.choice((8, 16, 32, 64, 128))
    extent = rng.random() < 0.5
    return _Variant(
        {"BLOCKS": f"{blocks}u", "VICTIM": rng.randrange(blocks), "WITH_EXTENT": extent},
        (
            "allocates_every_block_once",
            "rejects_double_free",
            "reuses_freed_block",
            *_if(extent, "allocates_contiguous_extent"),
        ),
        f"bitmap block allocator, blocks={blocks}, extents={extent}",
    )


def _run_queue(rng: random.Random) -> _Variant:
    slots = rng.choice((8, 16, 32, 64))
    quantum = rng.choice((2, 4, 5, 10, 20))
    remove = rng.random() < 0.5
    return _Variant(
        {"SLOTS": f"{slots}u", "QUANTUM": f"{quantum}u", "WITH_REMOVE": remove},
        (
            "round_robin_completion_order",
            "quantum_accounting",
            "full_queue_rejects",
            *_if(remove, "remove_keeps_order"),
        ),
        f"round-robin run queue, slots={slots}, quantum={quantum}, remove={remove}",
    )


def _access_control(rng: random.Random) -> _Variant:
    token_len = rng.choice((16, 24, 32))
    token = _hex_bytes(rng, token_len)
    entries = rng.choice((8, 16, 32))
    return _Variant(
        {
            "ENTRIES": f"{entries}u",
            "TOKEN_LEN": token_len,
            "TOKEN": token,
            "UID": f"{rng.randrange(1000, 60000)}u",
        },
        ("constant_time_compare", "default_deny", "explicit_deny_wins", "acl_capacity"),
        f"constant-time compare and ACL, entries={entries}, token={token_len} bytes",
    )


def _framebuffer_blit(rng: random.Random) -> _Variant:
    width = rng.choice((16, 32, 64, 80))
    height = rng.choice((12, 16, 24, 48))
    alpha = rng.choice(("40", "80", "C0", "7F"))
    fill_name = rng.choice(("fill", "clear"))
    return _Variant(
        {
            "WIDTH": width,
            "HEIGHT": height,
            "SOURCE_COLOR": f"0x{alpha}FFFFFFu",
            "FILL_FN": f"prefix_{fill_name}",
        },
        (
            "blend_exact_for_opaque_and_transparent",
            "blit_clips_top_left",
            "blit_clips_bottom_right",
        ),
        f"framebuffer blit and alpha blend, {width}x{height}",
    )


def _pcm_mixer(rng: random.Random) -> _Variant:
    max_inputs = rng.choice((4, 8, 16))
    return _Variant(
        {"MAX_INPUTS": f"{max_inputs}u"},
        ("saturates_instead_of_wrapping", "applies_q8_gain", "peak_meter"),
        f"PCM mixer with saturation, inputs<={max_inputs}",
    )


def _damage_tracker(rng: random.Random) -> _Variant:
    max_rects = rng.choice((4, 8, 16, 32))
    return _Variant(
        {"MAX_RECTS": f"{max_rects}u"},
        ("merges_overlapping_damage", "clips_to_screen", "collapses_when_full"),
        f"damage-rect tracker, rects<={max_rects}",
    )


def _latency_tracker(rng: random.Random) -> _Variant:
    window = rng.choice((8, 16, 32, 64, 100))
    percentile = rng.random() < 0.5
    return _Variant(
        {
            "WINDOW": f"{window}u",
            "EWMA_SHIFT": f"{rng.choice((2, 3, 4))}u",
            "WITH_PERCENTILE": percentile,
        },
        (
            "window_average",
            "tracks_max",
            "budget_check",
            *_if(percentile, "nearest_rank_percentile"),
        ),
        f"moving-average latency tracker, window={window}, percentile={percentile}",
    )


def _memory_allocator(rng: random.Random) -> _Variant:
    block_size = rng.choice((32, 64, 128, 256))
    block_count = rng.choice((16, 32, 64, 128))
    return _Variant(
        {
            "BLOCK_SIZE": f"{block_size}u",
            "BLOCK_COUNT": f"{block_count}u",
            "VICTIM": rng.randrange(block_count),
        },
        ("exhausts_and_refills", "rejects_double_free", "rejects_foreign_pointer"),
        f"fixed-size block pool, {block_count} x {block_size} bytes",
    )


def _file_cache(rng: random.Random) -> _Variant:
    entries = rng.choice((4, 8, 16, 32))
    block_bytes = rng.choice((64, 128, 512))
    return _Variant(
        {"ENTRIES": f"{entries}u", "BLOCK_BYTES": f"{block_bytes}u"},
        ("lru_eviction", "hit_accounting", "dirty_write_back", "device_error_propagates"),
        f"LRU block cache, {entries} x {block_bytes} bytes, write-back",
    )


def _network_stack(rng: random.Random) -> _Variant:
    bindings = rng.choice((8, 16, 64))
    return _Variant(
        {
            "BINDINGS": f"{bindings}u",
            "TTL": rng.choice((32, 64, 128, 255)),
            "IDENT": f"0x{rng.randrange(0x10000):04X}",
            "PORT": rng.choice((53, 67, 123, 514, 5353, 8080)),
        },
        ("ipv4_roundtrip", "corrupt_header_dropped", "port_demux", "duplicate_bind_refused"),
        f"IPv4 header codec and port demux, bindings<={bindings}",
    )


def _graphics_driver(rng: random.Random) -> _Variant:
    width = rng.choice((64, 80, 128))
    height = rng.choice((48, 60, 96))
    return _Variant(
        {"WIDTH": width, "HEIGHT": height, "COLOR": f"0xFF{rng.randrange(1, 0x1000000):06X}u"},
        ("draws_to_back_buffer", "flip_waits_for_vblank", "fill_rect_clips"),
        f"double-buffered display driver, {width}x{height}",
    )


def _audio_mixer(rng: random.Random) -> _Variant:
    voices = rng.choice((4, 8, 16, 32))
    ramp = rng.choice((8, 16, 32))
    return _Variant(
        {"VOICES": f"{voices}u", "RAMP_STEP": f"{ramp}u"},
        ("mixes_voices", "mute", "volume_ramp", "master_gain_clips", "voices_free_themselves"),
        f"voice mixer with volume ramps, voices={voices}, ramp={ramp}",
    )


def _security_module(rng: random.Random) -> _Variant:
    subjects = rng.choice((8, 16, 64))
    max_failures = rng.choice((3, 5))
    secret = _hex_bytes(rng, 8)
    return _Variant(
        {
            "SUBJECTS": f"{subjects}u",
            "MAX_FAILURES": f"{max_failures}u",
            "LOCKOUT_TICKS": f"{rng.choice((10, 30, 60))}ul",
            "AUDIT_SIZE": f"{rng.choice((4, 16, 64))}u",
            "SECRET": secret,
        },
        ("authenticates", "locks_out_after_failures", "lockout_expires", "audit_ring_bounded"),
        f"authentication gate with lockout, subjects<={subjects}, failures<{max_failures}",
    )


# ---------------------------------------------------------------------------
# Registry and public API
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Component:
    """A component: the stem of its test names, plausible identifier stems, its
    template (a file in codegen_templates/, without `.c`) and its maker."""

    kind: str
    stems: tuple[str, ...]
    template: str
    make: Callable[[random.Random], _Variant]

    def piece(self, prefix: str, rng: random.Random) -> _Piece:
        return _piece(self.template, prefix, self.make(rng))


_MODULES: Final[Mapping[str, _Component]] = MappingProxyType(
    {
        "networking": _Component(
            "packet_ring", ("rx_ring", "pkt_ring", "net_ring"), "ring_buffer", _ring_buffer
        ),
        "file_system": _Component(
            "block_allocator",
            ("blk_bitmap", "fs_balloc", "extent_map"),
            "bitmap_allocator",
            _bitmap_allocator,
        ),
        "process_manager": _Component(
            "run_queue", ("runq", "rr_sched", "sched_rq"), "run_queue", _run_queue
        ),
        "security": _Component(
            "access_control", ("acl", "sec_acl", "access"), "access_control", _access_control
        ),
        "graphics": _Component(
            "blitter", ("gfx", "blit", "compositor"), "framebuffer_blit", _framebuffer_blit
        ),
        "audio": _Component("pcm_mixer", ("pcm", "mixer", "snd_mix"), "pcm_mixer", _pcm_mixer),
        "window_manager": _Component(
            "damage_tracker", ("damage", "wm_damage", "dmg"), "damage_tracker", _damage_tracker
        ),
        "performance": _Component(
            "latency_tracker", ("lat", "perf_lat", "latency"), "latency_tracker", _latency_tracker
        ),
    }
)


def _feature_name(feature: pb.Feature.ValueType) -> str:
    """The contract's spelling in `RequestFeature.feature`: FEATURE_FILE_CACHE is "file_cache"."""
    return pb.Feature.Name(feature).removeprefix("FEATURE_").lower()


def _feature(
    feature: pb.Feature.ValueType, stems: tuple[str, ...], make: Callable[[random.Random], _Variant]
) -> tuple[str, _Component]:
    name = _feature_name(feature)
    return name, _Component(name, stems, name, make)


# One template per feature of the contract's `Feature` vocabulary (tests/test_codegen.py checks
# that none is missing).
_FEATURES: Final[Mapping[str, _Component]] = MappingProxyType(
    dict(
        _feature(*spec)
        for spec in (
            (pb.FEATURE_MEMORY_ALLOCATOR, ("kpool", "slab", "blkpool"), _memory_allocator),
            (pb.FEATURE_FILE_CACHE, ("bcache", "fcache", "lru_cache"), _file_cache),
            (pb.FEATURE_NETWORK_STACK, ("ip4", "netstk", "inet"), _network_stack),
            (pb.FEATURE_GRAPHICS_DRIVER, ("gpu", "disp", "fbdev"), _graphics_driver),
            (pb.FEATURE_AUDIO_MIXER, ("voicemix", "amix", "sndsrv"), _audio_mixer),
            (pb.FEATURE_SECURITY_MODULE, ("authgate", "secmod", "lsm"), _security_module),
        )
    )
)

FEATURES: Final[tuple[str, ...]] = tuple(_FEATURES)


def _unit(name: str, description: str, pieces: list[_Piece]) -> str:
    includes = sorted(frozenset[str]().union(*(p.includes for p in pieces)))
    lines = [
        f"/* {name}: {description}",
        " * Generated by the kernelhub trainer: self-contained C99, no entry point. */",
        "",
        *(f"#include <{h}>" for h in includes),
    ]
    body = "\n".join(p.body.strip("\n") + "\n" for p in pieces)
    return "\n".join(lines) + "\n\n" + body


def _single(name: str, component: _Component, rng: random.Random) -> GeneratedCode:
    piece = component.piece(rng.choice(component.stems), rng)
    return GeneratedCode(
        name=name,
        code=_unit(name, piece.summary, [piece]),
        entry_point=piece.selftest,
        test_cases=tuple(f"test_{component.kind}_{t}" for t in piece.tests),
        dependencies=("libc",),
    )


def _module(spec: str) -> _Component:
    if spec not in _MODULES:
        raise ValueError(f"no code generator for specialization {spec!r}")
    return _MODULES[spec]


def generate_module(specialization: Specialization, rng: random.Random) -> GeneratedCode:
    """The specialization's signature module (ring buffer for networking, ...)."""
    spec = specialization_name(specialization)
    return _single(f"{spec}_module", _module(spec), rng)


def is_known_feature(feature: str) -> bool:
    return feature in _FEATURES


def generate_feature(feature: str, rng: random.Random) -> GeneratedCode:
    """One of FEATURES (what feature requests ask for); ValueError for others."""
    if feature not in _FEATURES:
        raise ValueError(f"no template for feature {feature!r}; known: {', '.join(FEATURES)}")
    return _single(feature, _FEATURES[feature], rng)


def generate_collaborative(
    lead: Specialization,
    partner: Specialization,
    rng: random.Random,
    *,
    name: str = "collaborative_component",
) -> GeneratedCode:
    """Both partners' modules in one unit plus an integration layer; works for the
    same specialization twice (a code review) because the pieces get distinct
    prefixes."""
    lead_name = specialization_name(lead)
    partner_name = specialization_name(partner)
    lead_module, partner_module = _module(lead_name), _module(partner_name)
    lead_piece = lead_module.piece(f"{rng.choice(lead_module.stems)}_lead", rng)
    partner_piece = partner_module.piece(f"{rng.choice(partner_module.stems)}_peer", rng)
    glue_prefix = f"collab_{lead_name}_{partner_name}"
    glue = _Variant(
        {"LEAD_SELFTEST": lead_piece.selftest, "PARTNER_SELFTEST": partner_piece.selftest},
        ("integration",),
        "",
    )
    tests = (
        *(f"test_lead_{lead_module.kind}_{t}" for t in lead_piece.tests),
        *(f"test_peer_{partner_module.kind}_{t}" for t in partner_piece.tests),
        f"test_{glue_prefix}_integration",
    )
    return GeneratedCode(
        name=name,
        code=_unit(
            name,
            f"{lead_piece.summary}; with {partner_piece.summary}",
            [lead_piece, partner_piece, _piece("integration_glue", glue_prefix, glue)],
        ),
        entry_point=f"{glue_prefix}_selftest",
        test_cases=tests,
        dependencies=(f"{lead_name}_module", f"{partner_name}_module"),
    )
