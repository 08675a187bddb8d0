"""Plausible, compilable C99 for what the simulated trainers share.

Every unit is self-contained (its own includes, no `main`) and exposes an
`int <entry_point>(void)` self-test returning 0 when the code does what it
claims, so tests can compile *and* run it. Sizes, names and small design
choices come from the caller's `random.Random`: the same seed gives the same
source, different seeds give different but equally valid code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from string import Template
from types import MappingProxyType
from typing import Final

from trainer_service.capabilities import Specialization, specialization_name


@dataclass(frozen=True)
class GeneratedCode:
    """One C translation unit and what a component record needs to describe it."""

    name: str
    code: str
    entry_point: str
    test_cases: tuple[str, ...]
    dependencies: tuple[str, ...]


@dataclass(frozen=True)
class _Piece:
    """A fragment that can share a translation unit with others: every identifier
    it defines starts with its prefix."""

    prefix: str
    includes: frozenset[str]
    body: str
    selftest: str
    tests: tuple[str, ...]
    summary: str


_PieceMaker = Callable[[str, random.Random], _Piece]


def _render(template: str, prefix: str, **values: object) -> str:
    return Template(template).substitute(p=prefix, P=prefix.upper(), **values)


# ---------------------------------------------------------------------------
# Specialization modules
# ---------------------------------------------------------------------------

_RING_WRITE_LOOP = """
size_t ${p}_write(${p}_t *ring, const uint8_t *src, size_t len)
{
    size_t space = ${p}_space(ring);
    size_t n = len < space ? len : space;
    size_t i;
    for (i = 0; i < n; i++) {
        ring->data[(ring->head + (uint32_t)i) & ${P}_MASK] = src[i];
    }
    ring->head += (uint32_t)n;
    return n;
}

size_t ${p}_read(${p}_t *ring, uint8_t *dst, size_t len)
{
    size_t used = ${p}_used(ring);
    size_t n = len < used ? len : used;
    size_t i;
    for (i = 0; i < n; i++) {
        dst[i] = ring->data[(ring->tail + (uint32_t)i) & ${P}_MASK];
    }
    ring->tail += (uint32_t)n;
    return n;
}
"""

_RING_WRITE_MEMCPY = """
size_t ${p}_write(${p}_t *ring, const uint8_t *src, size_t len)
{
    size_t space = ${p}_space(ring);
    size_t n = len < space ? len : space;
    size_t start = (size_t)(ring->head & ${P}_MASK);
    size_t first = n < ${P}_CAPACITY - start ? n : ${P}_CAPACITY - start;
    memcpy(&ring->data[start], src, first);
    memcpy(&ring->data[0], src + first, n - first);
    ring->head += (uint32_t)n;
    return n;
}

size_t ${p}_read(${p}_t *ring, uint8_t *dst, size_t len)
{
    size_t used = ${p}_used(ring);
    size_t n = len < used ? len : used;
    size_t start = (size_t)(ring->tail & ${P}_MASK);
    size_t first = n < ${P}_CAPACITY - start ? n : ${P}_CAPACITY - start;
    memcpy(dst, &ring->data[start], first);
    memcpy(dst + first, &ring->data[0], n - first);
    ring->tail += (uint32_t)n;
    return n;
}
"""

_RING_CHECKSUM = """
/* RFC 1071 internet checksum over the bytes handed to the ring. */
uint16_t ${p}_checksum(const uint8_t *buf, size_t len)
{
    uint32_t sum = 0;
    size_t i;
    for (i = 0; i + 1 < len; i += 2) {
        sum += (uint32_t)((buf[i] << 8) | buf[i + 1]);
    }
    if (len & 1u) {
        sum += (uint32_t)(buf[len - 1] << 8);
    }
    while (sum >> 16) {
        sum = (sum & 0xFFFFu) + (sum >> 16);
    }
    return (uint16_t)~sum;
}
"""

_RING_CHECKSUM_TEST = """
    {
        uint8_t pkt[6] = {0x45, 0x00, 0x00, 0x1c, 0x00, 0x00};
        uint16_t c = ${p}_checksum(pkt, 4);
        pkt[4] = (uint8_t)(c >> 8);
        pkt[5] = (uint8_t)(c & 0xFFu);
        if (${p}_checksum(pkt, sizeof pkt) != 0) {
            return 6;
        }
    }
"""

_RING = """
/* Single-producer single-consumer byte ring for a NIC receive path. head and
 * tail run freely and wrap modulo 2^32; the capacity is a power of two so the
 * slot index is a mask. */
#define ${P}_CAPACITY ${capacity}u
#define ${P}_MASK (${P}_CAPACITY - 1u)

typedef struct {
    uint8_t data[${P}_CAPACITY];
    uint32_t head;
    uint32_t tail;
} ${p}_t;

void ${p}_init(${p}_t *ring)
{
    memset(ring, 0, sizeof *ring);
}

size_t ${p}_used(const ${p}_t *ring)
{
    return (size_t)(ring->head - ring->tail);
}

size_t ${p}_space(const ${p}_t *ring)
{
    return (size_t)${P}_CAPACITY - ${p}_used(ring);
}
${copy}${checksum}
int ${p}_selftest(void)
{
    static ${p}_t ring;
    uint8_t in[${chunk}];
    uint8_t out[${chunk}];
    size_t i;
    int round;

    ${p}_init(&ring);
    for (i = 0; i < sizeof in; i++) {
        in[i] = (uint8_t)(i * ${stride}u + 3u);
    }
    for (round = 0; round < 3; round++) {
        if (${p}_write(&ring, in, sizeof in) != sizeof in) {
            return 1;
        }
        if (${p}_read(&ring, out, sizeof out) != sizeof out) {
            return 2;
        }
        if (memcmp(in, out, sizeof in) != 0) {
            return 3;
        }
    }
    if (${p}_write(&ring, in, sizeof in) != sizeof in) {
        return 4;
    }
    if (${p}_write(&ring, in, sizeof in) != ${P}_CAPACITY - sizeof in || ${p}_space(&ring) != 0) {
        return 5;
    }
${checksum_test}    return 0;
}
"""


def _ring_buffer(prefix: str, rng: random.Random) -> _Piece:
    capacity = rng.choice((64, 128, 256, 512, 1024))
    chunk = capacity * 3 // 4
    copy = rng.choice(("loop", "memcpy"))
    checksum = rng.random() < 0.5
    body = _render(
        _RING,
        prefix,
        capacity=capacity,
        chunk=chunk,
        stride=rng.choice((3, 5, 7, 11)),
        copy=_render(_RING_WRITE_LOOP if copy == "loop" else _RING_WRITE_MEMCPY, prefix),
        checksum=_render(_RING_CHECKSUM, prefix) if checksum else "",
        checksum_test=_render(_RING_CHECKSUM_TEST, prefix) if checksum else "",
    )
    tests = ["wraparound_roundtrip", "full_ring_rejects_overflow"]
    if checksum:
        tests.append("checksum_verifies_to_zero")
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h", "stdint.h", "string.h"}),
        body=body,
        selftest=f"{prefix}_selftest",
        tests=tuple(tests),
        summary=f"packet ring buffer, capacity={capacity}, copy={copy}, checksum={checksum}",
    )


_BITMAP_EXTENT = """
/* Contiguous run of `count` free blocks, first fit; -1 when none is long enough. */
long ${p}_alloc_extent(${p}_t *bm, uint32_t count)
{
    uint32_t start = 0;
    uint32_t run = 0;
    uint32_t b;
    if (count == 0u || count > bm->free_count) {
        return -1;
    }
    for (b = 0; b < ${P}_BLOCKS; b++) {
        if (bm->bits[b / 32u] & (1u << (b % 32u))) {
            run = 0;
            start = b + 1u;
            continue;
        }
        if (++run == count) {
            uint32_t i;
            for (i = start; i < start + count; i++) {
                bm->bits[i / 32u] |= 1u << (i % 32u);
            }
            bm->free_count -= count;
            return (long)start;
        }
    }
    return -1;
}
"""

_BITMAP_EXTENT_TEST = """
    for (i = 10; i < 20; i++) {
        if (${p}_free(&bm, i) != 0) {
            return 6;
        }
    }
    if (${p}_alloc_extent(&bm, 4) != 10 || ${p}_alloc_extent(&bm, 7) != -1) {
        return 7;
    }
"""

_BITMAP = """
/* Free-block bitmap for an on-disk allocation group: one bit per block, a
 * running free count so "disk full" is O(1), and a search hint so allocation
 * does not rescan the full words at the front every time. */
#define ${P}_BLOCKS ${blocks}u
#define ${P}_WORDS (${P}_BLOCKS / 32u)

typedef struct {
    uint32_t bits[${P}_WORDS];
    uint32_t free_count;
    uint32_t hint;
} ${p}_t;

void ${p}_init(${p}_t *bm)
{
    memset(bm->bits, 0, sizeof bm->bits);
    bm->free_count = ${P}_BLOCKS;
    bm->hint = 0;
}

long ${p}_alloc(${p}_t *bm)
{
    uint32_t scanned;
    if (bm->free_count == 0u) {
        return -1;
    }
    for (scanned = 0; scanned < ${P}_WORDS; scanned++) {
        uint32_t w = (bm->hint + scanned) % ${P}_WORDS;
        uint32_t word = bm->bits[w];
        if (word != 0xFFFFFFFFu) {
            uint32_t bit = 0;
            while (word & (1u << bit)) {
                bit++;
            }
            bm->bits[w] |= 1u << bit;
            bm->free_count--;
            bm->hint = w;
            return (long)(w * 32u + bit);
        }
    }
    return -1;
}

int ${p}_is_allocated(const ${p}_t *bm, long block)
{
    if (block < 0 || block >= (long)${P}_BLOCKS) {
        return 0;
    }
    return (bm->bits[(uint32_t)block / 32u] >> ((uint32_t)block % 32u)) & 1u;
}

/* Returns -1 for out-of-range blocks and double frees instead of corrupting the count. */
int ${p}_free(${p}_t *bm, long block)
{
    uint32_t w;
    uint32_t mask;
    if (!${p}_is_allocated(bm, block)) {
        return -1;
    }
    w = (uint32_t)block / 32u;
    mask = 1u << ((uint32_t)block % 32u);
    bm->bits[w] &= ~mask;
    bm->free_count++;
    if (w < bm->hint) {
        bm->hint = w;
    }
    return 0;
}
${extent}
int ${p}_selftest(void)
{
    static ${p}_t bm;
    long i;

    ${p}_init(&bm);
    for (i = 0; i < (long)${P}_BLOCKS; i++) {
        if (${p}_alloc(&bm) != i) {
            return 1;
        }
    }
    if (${p}_alloc(&bm) != -1 || bm.free_count != 0u) {
        return 2;
    }
    if (${p}_free(&bm, ${victim}) != 0 || ${p}_free(&bm, ${victim}) != -1) {
        return 3;
    }
    if (${p}_alloc(&bm) != ${victim}) {
        return 4;
    }
    if (${p}_free(&bm, -1) != -1 || ${p}_free(&bm, (long)${P}_BLOCKS) != -1) {
        return 5;
    }
${extent_test}    return 0;
}
"""


def _bitmap_allocator(prefix: str, rng: random.Random) -> _Piece:
    blocks = 32 * rng.choice((8, 16, 32, 64, 128))
    extent = rng.random() < 0.5
    body = _render(
        _BITMAP,
        prefix,
        blocks=blocks,
        victim=rng.randrange(blocks),
        extent=_render(_BITMAP_EXTENT, prefix) if extent else "",
        extent_test=_render(_BITMAP_EXTENT_TEST, prefix) if extent else "",
    )
    tests = ["allocates_every_block_once", "rejects_double_free", "reuses_freed_block"]
    if extent:
        tests.append("allocates_contiguous_extent")
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stdint.h", "string.h"}),
        body=body,
        selftest=f"{prefix}_selftest",
        tests=tuple(tests),
        summary=f"bitmap block allocator, blocks={blocks}, extents={extent}",
    )


_RUNQ_REMOVE = """
/* Drops a task (it exited or was killed); keeps everyone else's order. */
int ${p}_remove(${p}_t *rq, int pid)
{
    size_t i;
    for (i = 0; i < rq->count; i++) {
        size_t at = (rq->head + i) % ${P}_SLOTS;
        if (rq->slots[at].pid == pid) {
            size_t j;
            for (j = i; j + 1 < rq->count; j++) {
                rq->slots[(rq->head + j) % ${P}_SLOTS] = rq->slots[(rq->head + j + 1) % ${P}_SLOTS];
            }
            rq->count--;
            return 0;
        }
    }
    return -1;
}
"""

_RUNQ_REMOVE_TEST = """
    if (${p}_enqueue(&rq, 7, 1) != 0 || ${p}_enqueue(&rq, 8, 1) != 0) {
        return 6;
    }
    if (${p}_remove(&rq, 7) != 0 || ${p}_remove(&rq, 7) != -1 || ${p}_tick(&rq) != 8) {
        return 7;
    }
"""

_RUNQ = """
/* Round-robin run queue: a fixed ring of runnable tasks; each tick runs the
 * head for at most one quantum and puts it back at the tail if work remains. */
#define ${P}_SLOTS ${slots}u

typedef struct {
    int pid;
    unsigned remaining;
    unsigned ran;
} ${p}_task;

typedef struct {
    ${p}_task slots[${P}_SLOTS];
    size_t head;
    size_t count;
    unsigned quantum;
    unsigned long clock;
} ${p}_t;

void ${p}_init(${p}_t *rq, unsigned quantum)
{
    rq->head = 0;
    rq->count = 0;
    rq->quantum = quantum == 0u ? 1u : quantum;
    rq->clock = 0;
}

int ${p}_enqueue(${p}_t *rq, int pid, unsigned work)
{
    ${p}_task *slot;
    if (pid <= 0 || work == 0u || rq->count == ${P}_SLOTS) {
        return -1;
    }
    slot = &rq->slots[(rq->head + rq->count) % ${P}_SLOTS];
    slot->pid = pid;
    slot->remaining = work;
    slot->ran = 0;
    rq->count++;
    return 0;
}

/* Returns the pid of a task that just finished, 0 if the task ran and was
 * requeued, -1 if nothing is runnable. */
int ${p}_tick(${p}_t *rq)
{
    ${p}_task task;
    unsigned slice;
    if (rq->count == 0u) {
        return -1;
    }
    task = rq->slots[rq->head];
    rq->head = (rq->head + 1u) % ${P}_SLOTS;
    rq->count--;
    slice = task.remaining < rq->quantum ? task.remaining : rq->quantum;
    task.remaining -= slice;
    task.ran += slice;
    rq->clock += slice;
    if (task.remaining == 0u) {
        return task.pid;
    }
    rq->slots[(rq->head + rq->count) % ${P}_SLOTS] = task;
    rq->count++;
    return 0;
}
${remove}
int ${p}_selftest(void)
{
    static ${p}_t rq;
    int order[3];
    int finished = 0;
    int steps;
    int i;

    ${p}_init(&rq, ${quantum}u);
    if (${p}_enqueue(&rq, 1, ${quantum}u) != 0 || ${p}_enqueue(&rq, 2, 3u * ${quantum}u) != 0 ||
        ${p}_enqueue(&rq, 3, 2u * ${quantum}u) != 0) {
        return 1;
    }
    for (steps = 0; steps < 100 && finished < 3; steps++) {
        int pid = ${p}_tick(&rq);
        if (pid > 0) {
            order[finished++] = pid;
        }
    }
    if (finished != 3 || order[0] != 1 || order[1] != 3 || order[2] != 2) {
        return 2;
    }
    if (rq.clock != 6ul * ${quantum}u || ${p}_tick(&rq) != -1) {
        return 3;
    }
    for (i = 0; i < (int)${P}_SLOTS; i++) {
        if (${p}_enqueue(&rq, i + 1, 1) != 0) {
            return 4;
        }
    }
    if (${p}_enqueue(&rq, 99, 1) != -1) {
        return 5;
    }
    while (${p}_tick(&rq) > 0) {
    }
${remove_test}    return 0;
}
"""


def _run_queue(prefix: str, rng: random.Random) -> _Piece:
    slots = rng.choice((8, 16, 32, 64))
    quantum = rng.choice((2, 4, 5, 10, 20))
    remove = rng.random() < 0.5
    body = _render(
        _RUNQ,
        prefix,
        slots=slots,
        quantum=quantum,
        remove=_render(_RUNQ_REMOVE, prefix) if remove else "",
        remove_test=_render(_RUNQ_REMOVE_TEST, prefix) if remove else "",
    )
    tests = ["round_robin_completion_order", "quantum_accounting", "full_queue_rejects"]
    if remove:
        tests.append("remove_keeps_order")
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h"}),
        body=body,
        selftest=f"{prefix}_selftest",
        tests=tuple(tests),
        summary=f"round-robin run queue, slots={slots}, quantum={quantum}, remove={remove}",
    )


_ACL = """
/* Token comparison that takes the same time wherever the first difference is,
 * plus a default-deny access-control list where an explicit deny wins. */
#define ${P}_MAX_ENTRIES ${entries}u
#define ${P}_PERM_READ 0x1u
#define ${P}_PERM_WRITE 0x2u
#define ${P}_PERM_EXEC 0x4u
#define ${P}_ANY_UID 0xFFFFFFFFu

typedef struct {
    uint32_t uid;
    uint32_t allow;
    uint32_t deny;
} ${p}_ace;

typedef struct {
    ${p}_ace entries[${P}_MAX_ENTRIES];
    size_t count;
} ${p}_acl;

int ${p}_ct_equal(const uint8_t *a, const uint8_t *b, size_t len)
{
    volatile uint8_t diff = 0;
    size_t i;
    for (i = 0; i < len; i++) {
        diff |= (uint8_t)(a[i] ^ b[i]);
    }
    return diff == 0;
}

void ${p}_acl_init(${p}_acl *acl)
{
    acl->count = 0;
}

static ${p}_ace *${p}_acl_entry(${p}_acl *acl, uint32_t uid, int create)
{
    size_t i;
    for (i = 0; i < acl->count; i++) {
        if (acl->entries[i].uid == uid) {
            return &acl->entries[i];
        }
    }
    if (!create || acl->count == ${P}_MAX_ENTRIES) {
        return NULL;
    }
    acl->entries[acl->count].uid = uid;
    acl->entries[acl->count].allow = 0;
    acl->entries[acl->count].deny = 0;
    return &acl->entries[acl->count++];
}

int ${p}_acl_grant(${p}_acl *acl, uint32_t uid, uint32_t perms)
{
    ${p}_ace *e = ${p}_acl_entry(acl, uid, 1);
    if (e == NULL) {
        return -1;
    }
    e->allow |= perms;
    return 0;
}

int ${p}_acl_deny(${p}_acl *acl, uint32_t uid, uint32_t perms)
{
    ${p}_ace *e = ${p}_acl_entry(acl, uid, 1);
    if (e == NULL) {
        return -1;
    }
    e->deny |= perms;
    return 0;
}

int ${p}_acl_check(const ${p}_acl *acl, uint32_t uid, uint32_t want)
{
    uint32_t allow = 0;
    uint32_t deny = 0;
    size_t i;
    if (want == 0u) {
        return 0;
    }
    for (i = 0; i < acl->count; i++) {
        if (acl->entries[i].uid == uid || acl->entries[i].uid == ${P}_ANY_UID) {
            allow |= acl->entries[i].allow;
            deny |= acl->entries[i].deny;
        }
    }
    return (want & deny) == 0u && (want & allow) == want;
}

int ${p}_selftest(void)
{
    static ${p}_acl acl;
    const uint8_t token[${token_len}] = {${token}};
    uint8_t probe[${token_len}];
    uint32_t uid;

    memcpy(probe, token, sizeof probe);
    if (!${p}_ct_equal(token, probe, sizeof probe)) {
        return 1;
    }
    probe[sizeof probe - 1] ^= 0x1u;
    if (${p}_ct_equal(token, probe, sizeof probe)) {
        return 2;
    }
    ${p}_acl_init(&acl);
    if (${p}_acl_grant(&acl, ${uid}u, ${P}_PERM_READ | ${P}_PERM_WRITE) != 0) {
        return 3;
    }
    if (!${p}_acl_check(&acl, ${uid}u, ${P}_PERM_READ) || ${p}_acl_check(&acl, ${uid}u, ${P}_PERM_EXEC) ||
        ${p}_acl_check(&acl, ${uid}u + 1u, ${P}_PERM_READ)) {
        return 4;
    }
    if (${p}_acl_deny(&acl, ${uid}u, ${P}_PERM_WRITE) != 0 ||
        ${p}_acl_check(&acl, ${uid}u, ${P}_PERM_READ | ${P}_PERM_WRITE)) {
        return 5;
    }
    if (${p}_acl_grant(&acl, ${P}_ANY_UID, ${P}_PERM_EXEC) != 0 || !${p}_acl_check(&acl, 7u, ${P}_PERM_EXEC)) {
        return 6;
    }
    for (uid = 1; uid <= ${P}_MAX_ENTRIES; uid++) {
        (void)${p}_acl_grant(&acl, ${uid}u + 100u + uid, ${P}_PERM_READ);
    }
    if (acl.count != ${P}_MAX_ENTRIES || ${p}_acl_grant(&acl, 1u, ${P}_PERM_READ) != -1) {
        return 7;
    }
    return 0;
}
"""


def _access_control(prefix: str, rng: random.Random) -> _Piece:
    token_len = rng.choice((16, 24, 32))
    token = ", ".join(f"0x{rng.randrange(256):02x}" for _ in range(token_len))
    entries = rng.choice((8, 16, 32))
    body = _render(
        _ACL,
        prefix,
        entries=entries,
        token_len=token_len,
        token=token,
        uid=rng.randrange(1000, 60000),
    )
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h", "stdint.h", "string.h"}),
        body=body,
        selftest=f"{prefix}_selftest",
        tests=("constant_time_compare", "default_deny", "explicit_deny_wins", "acl_capacity"),
        summary=f"constant-time compare and ACL, entries={entries}, token={token_len} bytes",
    )


_BLIT = """
/* Software compositor primitives on ARGB8888 surfaces: a source-over blend in
 * integer arithmetic (rounded, so opaque and transparent sources are exact) and
 * a clipped blit that blends a surface onto another. */
typedef struct {
    uint32_t *pixels;
    int width;
    int height;
    int stride; /* in pixels */
} ${p}_surface;

uint32_t ${p}_blend(uint32_t dst, uint32_t src)
{
    uint32_t a = src >> 24;
    uint32_t inv = 255u - a;
    uint32_t r = (((src >> 16) & 0xFFu) * a + ((dst >> 16) & 0xFFu) * inv + 127u) / 255u;
    uint32_t g = (((src >> 8) & 0xFFu) * a + ((dst >> 8) & 0xFFu) * inv + 127u) / 255u;
    uint32_t b = ((src & 0xFFu) * a + (dst & 0xFFu) * inv + 127u) / 255u;
    uint32_t out_a = a + ((dst >> 24) * inv + 127u) / 255u;
    return (out_a << 24) | (r << 16) | (g << 8) | b;
}

void ${p}_${fill_name}(${p}_surface *s, uint32_t color)
{
    int x;
    int y;
    for (y = 0; y < s->height; y++) {
        uint32_t *row = s->pixels + (size_t)y * (size_t)s->stride;
        for (x = 0; x < s->width; x++) {
            row[x] = color;
        }
    }
}

void ${p}_blit(${p}_surface *dst, const ${p}_surface *src, int dx, int dy)
{
    int sx0 = 0;
    int sy0 = 0;
    int w = src->width;
    int h = src->height;
    int x;
    int y;
    if (dx < 0) {
        sx0 = -dx;
        w += dx;
        dx = 0;
    }
    if (dy < 0) {
        sy0 = -dy;
        h += dy;
        dy = 0;
    }
    if (dx + w > dst->width) {
        w = dst->width - dx;
    }
    if (dy + h > dst->height) {
        h = dst->height - dy;
    }
    if (w <= 0 || h <= 0) {
        return;
    }
    for (y = 0; y < h; y++) {
        uint32_t *drow = dst->pixels + (size_t)(dy + y) * (size_t)dst->stride + (size_t)dx;
        const uint32_t *srow = src->pixels + (size_t)(sy0 + y) * (size_t)src->stride + (size_t)sx0;
        for (x = 0; x < w; x++) {
            drow[x] = ${p}_blend(drow[x], srow[x]);
        }
    }
}

int ${p}_selftest(void)
{
    static uint32_t fb[${height}][${width}];
    static uint32_t sprite[4][4];
    ${p}_surface dst;
    ${p}_surface src;
    uint32_t expect;

    dst.pixels = &fb[0][0];
    dst.width = ${width};
    dst.height = ${height};
    dst.stride = ${width};
    src.pixels = &sprite[0][0];
    src.width = 4;
    src.height = 4;
    src.stride = 4;

    if (${p}_blend(0xFF102030u, 0xFF123456u) != 0xFF123456u || ${p}_blend(0xFF102030u, 0x00ABCDEFu) != 0xFF102030u) {
        return 1;
    }
    ${p}_${fill_name}(&dst, 0xFF000000u);
    ${p}_${fill_name}(&src, 0x${alpha}FFFFFFu);
    ${p}_blit(&dst, &src, -2, -2);
    expect = ${p}_blend(0xFF000000u, 0x${alpha}FFFFFFu);
    if (fb[0][0] != expect || fb[1][1] != expect || fb[2][2] != 0xFF000000u) {
        return 2;
    }
    ${p}_blit(&dst, &src, ${width} - 1, ${height} - 1);
    if (fb[${height} - 1][${width} - 1] != expect || fb[${height} - 2][${width} - 2] != 0xFF000000u) {
        return 3;
    }
    ${p}_blit(&dst, &src, ${width}, 0);
    ${p}_blit(&dst, &src, -4, 0);
    if (fb[0][${width} - 1] != 0xFF000000u) {
        return 4;
    }
    return 0;
}
"""


def _framebuffer_blit(prefix: str, rng: random.Random) -> _Piece:
    width = rng.choice((16, 32, 64, 80))
    height = rng.choice((12, 16, 24, 48))
    alpha = rng.choice(("40", "80", "C0", "7F"))
    fill_name = rng.choice(("fill", "clear"))
    body = _render(_BLIT, prefix, width=width, height=height, alpha=alpha, fill_name=fill_name)
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h", "stdint.h"}),
        body=body,
        selftest=f"{prefix}_selftest",
        tests=(
            "blend_exact_for_opaque_and_transparent",
            "blit_clips_top_left",
            "blit_clips_bottom_right",
        ),
        summary=f"framebuffer blit and alpha blend, {width}x{height}",
    )


_MIXER = """
/* Mixes signed 16-bit PCM streams with Q8.8 gains into one buffer; the sum is
 * accumulated in 32 bits and saturated once, so loud inputs clip instead of
 * wrapping around into noise. */
#define ${P}_MAX_INPUTS ${max_inputs}u
#define ${P}_UNITY_GAIN 256u

int16_t ${p}_saturate(int32_t v)
{
    if (v > INT16_MAX) {
        return INT16_MAX;
    }
    if (v < INT16_MIN) {
        return INT16_MIN;
    }
    return (int16_t)v;
}

int ${p}_mix(int16_t *out, const int16_t *const *inputs, const uint16_t *gains, size_t n_inputs,
             size_t frames)
{
    size_t f;
    size_t i;
    if (n_inputs > ${P}_MAX_INPUTS) {
        return -1;
    }
    for (f = 0; f < frames; f++) {
        int32_t acc = 0;
        for (i = 0; i < n_inputs; i++) {
            acc += (int32_t)inputs[i][f] * (int32_t)gains[i] / (int32_t)${P}_UNITY_GAIN;
        }
        out[f] = ${p}_saturate(acc);
    }
    return 0;
}

uint16_t ${p}_peak(const int16_t *buf, size_t frames)
{
    uint16_t peak = 0;
    size_t f;
    for (f = 0; f < frames; f++) {
        int32_t v = buf[f] < 0 ? -(int32_t)buf[f] : (int32_t)buf[f];
        if ((uint32_t)v > peak) {
            peak = (uint16_t)v;
        }
    }
    return peak;
}

int ${p}_selftest(void)
{
    static const int16_t a[4] = {30000, -30000, 100, 0};
    static const int16_t b[4] = {10000, -10000, 100, -5};
    const int16_t *inputs[2];
    uint16_t gains[2];
    int16_t out[4];

    inputs[0] = a;
    inputs[1] = b;
    gains[0] = ${P}_UNITY_GAIN;
    gains[1] = ${P}_UNITY_GAIN;
    if (${p}_mix(out, inputs, gains, 2, 4) != 0) {
        return 1;
    }
    if (out[0] != INT16_MAX || out[1] != INT16_MIN || out[2] != 200 || out[3] != -5) {
        return 2;
    }
    gains[0] = ${P}_UNITY_GAIN / 2u;
    gains[1] = 0;
    if (${p}_mix(out, inputs, gains, 2, 4) != 0 || out[0] != 15000 || out[1] != -15000 || out[2] != 50) {
        return 3;
    }
    if (${p}_peak(out, 4) != 15000u || ${p}_mix(out, inputs, gains, ${P}_MAX_INPUTS + 1u, 4) != -1) {
        return 4;
    }
    return 0;
}
"""


def _pcm_mixer(prefix: str, rng: random.Random) -> _Piece:
    max_inputs = rng.choice((4, 8, 16))
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h", "stdint.h"}),
        body=_render(_MIXER, prefix, max_inputs=max_inputs),
        selftest=f"{prefix}_selftest",
        tests=("saturates_instead_of_wrapping", "applies_q8_gain", "peak_meter"),
        summary=f"PCM mixer with saturation, inputs<={max_inputs}",
    )


_DAMAGE = """
/* Tracks which parts of the screen must be repainted. Rectangles are
 * half-open and kept pairwise non-touching, so the total damaged area is the
 * plain sum; when the table fills up everything collapses into one bounding
 * box (repainting a bit more beats dropping damage). */
#define ${P}_MAX_RECTS ${max_rects}u

typedef struct {
    int x0;
    int y0;
    int x1;
    int y1;
} ${p}_rect;

typedef struct {
    ${p}_rect rects[${P}_MAX_RECTS];
    size_t count;
    int width;
    int height;
} ${p}_t;

int ${p}_rect_empty(${p}_rect r)
{
    return r.x0 >= r.x1 || r.y0 >= r.y1;
}

int ${p}_rect_touches(${p}_rect a, ${p}_rect b)
{
    return a.x0 <= b.x1 && b.x0 <= a.x1 && a.y0 <= b.y1 && b.y0 <= a.y1;
}

${p}_rect ${p}_rect_union(${p}_rect a, ${p}_rect b)
{
    ${p}_rect u;
    u.x0 = a.x0 < b.x0 ? a.x0 : b.x0;
    u.y0 = a.y0 < b.y0 ? a.y0 : b.y0;
    u.x1 = a.x1 > b.x1 ? a.x1 : b.x1;
    u.y1 = a.y1 > b.y1 ? a.y1 : b.y1;
    return u;
}

void ${p}_init(${p}_t *t, int width, int height)
{
    t->count = 0;
    t->width = width;
    t->height = height;
}

void ${p}_add(${p}_t *t, ${p}_rect r)
{
    size_t i = 0;
    r.x0 = r.x0 < 0 ? 0 : r.x0;
    r.y0 = r.y0 < 0 ? 0 : r.y0;
    r.x1 = r.x1 > t->width ? t->width : r.x1;
    r.y1 = r.y1 > t->height ? t->height : r.y1;
    if (${p}_rect_empty(r)) {
        return;
    }
    /* Each merge removes a stored rect, so this ends after at most count restarts. */
    while (i < t->count) {
        if (${p}_rect_touches(t->rects[i], r)) {
            r = ${p}_rect_union(t->rects[i], r);
            t->rects[i] = t->rects[t->count - 1];
            t->count--;
            i = 0;
        } else {
            i++;
        }
    }
    if (t->count == ${P}_MAX_RECTS) {
        for (i = 0; i < t->count; i++) {
            r = ${p}_rect_union(t->rects[i], r);
        }
        t->count = 0;
    }
    t->rects[t->count++] = r;
}

long ${p}_area(const ${p}_t *t)
{
    long total = 0;
    size_t i;
    for (i = 0; i < t->count; i++) {
        total += (long)(t->rects[i].x1 - t->rects[i].x0) * (long)(t->rects[i].y1 - t->rects[i].y0);
    }
    return total;
}

int ${p}_selftest(void)
{
    static ${p}_t t;
    ${p}_rect r;
    int k;

    ${p}_init(&t, 100, 100);
    r.x0 = 0; r.y0 = 0; r.x1 = 10; r.y1 = 10;
    ${p}_add(&t, r);
    r.x0 = 5; r.y0 = 5; r.x1 = 20; r.y1 = 20;
    ${p}_add(&t, r);
    if (t.count != 1u || ${p}_area(&t) != 400) {
        return 1;
    }
    r.x0 = 50; r.y0 = 50; r.x1 = 60; r.y1 = 60;
    ${p}_add(&t, r);
    r.x0 = -10; r.y0 = -10; r.x1 = 5; r.y1 = 5;
    ${p}_add(&t, r);
    r.x0 = 200; r.y0 = 200; r.x1 = 300; r.y1 = 300;
    ${p}_add(&t, r);
    if (t.count != 2u || ${p}_area(&t) != 500) {
        return 2;
    }
    ${p}_init(&t, 100, 100);
    for (k = 0; k < (int)${P}_MAX_RECTS; k++) {
        r.x0 = k * 3; r.y0 = 90; r.x1 = k * 3 + 1; r.y1 = 91;
        ${p}_add(&t, r);
    }
    if (t.count != ${P}_MAX_RECTS) {
        return 3;
    }
    r.x0 = 0; r.y0 = 0; r.x1 = 1; r.y1 = 1;
    ${p}_add(&t, r);
    if (t.count != 1u || t.rects[0].y0 != 0 || t.rects[0].y1 != 91) {
        return 4;
    }
    return 0;
}
"""


def _damage_tracker(prefix: str, rng: random.Random) -> _Piece:
    max_rects = rng.choice((4, 8, 16, 32))
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h"}),
        body=_render(_DAMAGE, prefix, max_rects=max_rects),
        selftest=f"{prefix}_selftest",
        tests=("merges_overlapping_damage", "clips_to_screen", "collapses_when_full"),
        summary=f"damage-rect tracker, rects<={max_rects}",
    )


_LATENCY_PERCENTILE = """
/* Nearest-rank percentile over the window (insertion sort of a copy: the
 * window is small and this runs off the hot path). */
uint32_t ${p}_percentile(const ${p}_t *t, unsigned pct)
{
    uint32_t sorted[${P}_WINDOW];
    size_t i;
    if (t->count == 0u) {
        return 0;
    }
    if (pct > 100u) {
        pct = 100u;
    }
    for (i = 0; i < t->count; i++) {
        size_t j = i;
        uint32_t v = t->samples[i];
        while (j > 0 && sorted[j - 1] > v) {
            sorted[j] = sorted[j - 1];
            j--;
        }
        sorted[j] = v;
    }
    return sorted[(t->count - 1u) * pct / 100u];
}
"""

_LATENCY_PERCENTILE_TEST = """
    if (${p}_percentile(&t, 100) != 2u * ${P}_WINDOW || ${p}_percentile(&t, 0) != ${P}_WINDOW + 1u) {
        return 4;
    }
"""

_LATENCY = """
/* Moving-average latency tracker: a fixed window of the latest samples with a
 * running sum, so the average is O(1) per sample, plus an EWMA that reacts
 * faster to a sudden regression than the window does. */
#define ${P}_WINDOW ${window}u
#define ${P}_EWMA_SHIFT ${shift}u

typedef struct {
    uint32_t samples[${P}_WINDOW];
    size_t next;
    size_t count;
    uint64_t sum;
    uint32_t max_seen;
    uint32_t ewma;
} ${p}_t;

void ${p}_init(${p}_t *t)
{
    memset(t, 0, sizeof *t);
}

void ${p}_record(${p}_t *t, uint32_t latency_us)
{
    if (t->count == ${P}_WINDOW) {
        t->sum -= t->samples[t->next];
    } else {
        t->count++;
    }
    t->samples[t->next] = latency_us;
    t->sum += latency_us;
    t->next = (t->next + 1u) % ${P}_WINDOW;
    if (latency_us > t->max_seen) {
        t->max_seen = latency_us;
    }
    if (t->count == 1u) {
        t->ewma = latency_us;
    } else if (latency_us >= t->ewma) {
        t->ewma += (latency_us - t->ewma) >> ${P}_EWMA_SHIFT;
    } else {
        t->ewma -= (t->ewma - latency_us) >> ${P}_EWMA_SHIFT;
    }
}

uint32_t ${p}_average(const ${p}_t *t)
{
    return t->count == 0u ? 0u : (uint32_t)(t->sum / t->count);
}

int ${p}_over_budget(const ${p}_t *t, uint32_t budget_us)
{
    return ${p}_average(t) > budget_us || t->ewma > budget_us;
}
${percentile}
int ${p}_selftest(void)
{
    static ${p}_t t;
    uint64_t expect = 0;
    uint32_t v;

    ${p}_init(&t);
    if (${p}_average(&t) != 0u) {
        return 1;
    }
    for (v = 1; v <= 2u * ${P}_WINDOW; v++) {
        ${p}_record(&t, v);
    }
    for (v = ${P}_WINDOW + 1u; v <= 2u * ${P}_WINDOW; v++) {
        expect += v;
    }
    if (${p}_average(&t) != (uint32_t)(expect / ${P}_WINDOW) || t.count != ${P}_WINDOW) {
        return 2;
    }
    if (t.max_seen != 2u * ${P}_WINDOW || ${p}_over_budget(&t, 4u * ${P}_WINDOW) ||
        !${p}_over_budget(&t, 1u)) {
        return 3;
    }
${percentile_test}    return 0;
}
"""


def _latency_tracker(prefix: str, rng: random.Random) -> _Piece:
    window = rng.choice((8, 16, 32, 64, 100))
    percentile = rng.random() < 0.5
    body = _render(
        _LATENCY,
        prefix,
        window=window,
        shift=rng.choice((2, 3, 4)),
        percentile=_render(_LATENCY_PERCENTILE, prefix) if percentile else "",
        percentile_test=_render(_LATENCY_PERCENTILE_TEST, prefix) if percentile else "",
    )
    tests = ["window_average", "tracks_max", "budget_check"]
    if percentile:
        tests.append("nearest_rank_percentile")
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h", "stdint.h", "string.h"}),
        body=body,
        selftest=f"{prefix}_selftest",
        tests=tuple(tests),
        summary=f"moving-average latency tracker, window={window}, percentile={percentile}",
    )


# ---------------------------------------------------------------------------
# Feature templates
# ---------------------------------------------------------------------------

_POOL = """
/* Fixed-size block pool: O(1) alloc/free from an intrusive free list threaded
 * through the unused blocks, with the pointer validated on free so a stray
 * pointer or a double free is refused instead of corrupting the list. */
#define ${P}_BLOCK_SIZE ${block_size}u
#define ${P}_BLOCK_COUNT ${block_count}u

typedef union ${p}_block {
    union ${p}_block *next;
    unsigned char bytes[${P}_BLOCK_SIZE];
} ${p}_block;

typedef struct {
    ${p}_block arena[${P}_BLOCK_COUNT];
    ${p}_block *free_list;
    size_t in_use;
} ${p}_t;

void ${p}_init(${p}_t *pool)
{
    size_t i;
    pool->free_list = NULL;
    for (i = ${P}_BLOCK_COUNT; i > 0; i--) {
        pool->arena[i - 1].next = pool->free_list;
        pool->free_list = &pool->arena[i - 1];
    }
    pool->in_use = 0;
}

void *${p}_alloc(${p}_t *pool)
{
    ${p}_block *b = pool->free_list;
    if (b == NULL) {
        return NULL;
    }
    pool->free_list = b->next;
    pool->in_use++;
    return b;
}

int ${p}_free(${p}_t *pool, void *ptr)
{
    uintptr_t base = (uintptr_t)pool->arena;
    uintptr_t p = (uintptr_t)ptr;
    ${p}_block *b;
    ${p}_block *it;
    size_t steps = 0;
    if (ptr == NULL || p < base || p >= base + sizeof pool->arena || (p - base) % sizeof(${p}_block) != 0u) {
        return -1;
    }
    b = &pool->arena[(p - base) / sizeof(${p}_block)];
    for (it = pool->free_list; it != NULL && steps < ${P}_BLOCK_COUNT; it = it->next, steps++) {
        if (it == b) {
            return -1;
        }
    }
    b->next = pool->free_list;
    pool->free_list = b;
    pool->in_use--;
    return 0;
}

size_t ${p}_available(const ${p}_t *pool)
{
    return ${P}_BLOCK_COUNT - pool->in_use;
}

int ${p}_selftest(void)
{
    static ${p}_t pool;
    static void *held[${P}_BLOCK_COUNT];
    size_t i;
    void *again;

    ${p}_init(&pool);
    for (i = 0; i < ${P}_BLOCK_COUNT; i++) {
        held[i] = ${p}_alloc(&pool);
        if (held[i] == NULL) {
            return 1;
        }
        memset(held[i], (int)(i & 0xFFu), ${P}_BLOCK_SIZE);
    }
    if (${p}_alloc(&pool) != NULL || ${p}_available(&pool) != 0u) {
        return 2;
    }
    if (${p}_free(&pool, held[${victim}]) != 0 || ${p}_free(&pool, held[${victim}]) != -1) {
        return 3;
    }
    again = ${p}_alloc(&pool);
    if (again != held[${victim}]) {
        return 4;
    }
    if (${p}_free(&pool, (unsigned char *)held[0] + 1) != -1 || ${p}_free(&pool, NULL) != -1) {
        return 5;
    }
    for (i = 0; i < ${P}_BLOCK_COUNT; i++) {
        if (${p}_free(&pool, held[i]) != 0) {
            return 6;
        }
    }
    return ${p}_available(&pool) == ${P}_BLOCK_COUNT ? 0 : 7;
}
"""


def _memory_allocator(prefix: str, rng: random.Random) -> _Piece:
    block_size = rng.choice((32, 64, 128, 256))
    block_count = rng.choice((16, 32, 64, 128))
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h", "stdint.h", "string.h"}),
        body=_render(
            _POOL,
            prefix,
            block_size=block_size,
            block_count=block_count,
            victim=rng.randrange(block_count),
        ),
        selftest=f"{prefix}_selftest",
        tests=("exhausts_and_refills", "rejects_double_free", "rejects_foreign_pointer"),
        summary=f"fixed-size block pool, {block_count} x {block_size} bytes",
    )


_CACHE = """
/* Block cache in front of a slow device: fixed slots, least-recently-used
 * eviction, and write-back of dirty blocks on eviction or flush. The device is
 * reached through callbacks so the cache is testable without one. */
#define ${P}_ENTRIES ${entries}u
#define ${P}_BLOCK_BYTES ${block_bytes}u

typedef int (*${p}_read_fn)(uint64_t block_no, uint8_t *buf, void *ctx);
typedef int (*${p}_write_fn)(uint64_t block_no, const uint8_t *buf, void *ctx);

typedef struct {
    uint64_t block_no;
    unsigned long last_used;
    int valid;
    int dirty;
    uint8_t data[${P}_BLOCK_BYTES];
} ${p}_entry;

typedef struct {
    ${p}_entry entries[${P}_ENTRIES];
    unsigned long clock;
    unsigned long hits;
    unsigned long misses;
    unsigned long writebacks;
} ${p}_t;

void ${p}_init(${p}_t *c)
{
    memset(c, 0, sizeof *c);
}

${p}_entry *${p}_lookup(${p}_t *c, uint64_t block_no)
{
    size_t i;
    for (i = 0; i < ${P}_ENTRIES; i++) {
        if (c->entries[i].valid && c->entries[i].block_no == block_no) {
            return &c->entries[i];
        }
    }
    return NULL;
}

uint8_t *${p}_get(${p}_t *c, uint64_t block_no, ${p}_read_fn read, ${p}_write_fn write, void *ctx)
{
    ${p}_entry *e = ${p}_lookup(c, block_no);
    size_t i;
    c->clock++;
    if (e != NULL) {
        c->hits++;
        e->last_used = c->clock;
        return e->data;
    }
    c->misses++;
    e = &c->entries[0];
    for (i = 0; i < ${P}_ENTRIES; i++) {
        if (!c->entries[i].valid) {
            e = &c->entries[i];
            break;
        }
        if (c->entries[i].last_used < e->last_used) {
            e = &c->entries[i];
        }
    }
    if (e->valid && e->dirty) {
        if (write(e->block_no, e->data, ctx) != 0) {
            return NULL;
        }
        c->writebacks++;
    }
    e->valid = 0;
    if (read(block_no, e->data, ctx) != 0) {
        return NULL;
    }
    e->block_no = block_no;
    e->valid = 1;
    e->dirty = 0;
    e->last_used = c->clock;
    return e->data;
}

int ${p}_mark_dirty(${p}_t *c, uint64_t block_no)
{
    ${p}_entry *e = ${p}_lookup(c, block_no);
    if (e == NULL) {
        return -1;
    }
    e->dirty = 1;
    return 0;
}

int ${p}_flush(${p}_t *c, ${p}_write_fn write, void *ctx)
{
    size_t i;
    for (i = 0; i < ${P}_ENTRIES; i++) {
        ${p}_entry *e = &c->entries[i];
        if (e->valid && e->dirty) {
            if (write(e->block_no, e->data, ctx) != 0) {
                return -1;
            }
            e->dirty = 0;
            c->writebacks++;
        }
    }
    return 0;
}

static uint8_t ${p}_disk[${P}_ENTRIES + 2u][${P}_BLOCK_BYTES];

static int ${p}_disk_read(uint64_t block_no, uint8_t *buf, void *ctx)
{
    (void)ctx;
    if (block_no >= ${P}_ENTRIES + 2u) {
        return -1;
    }
    memcpy(buf, ${p}_disk[block_no], ${P}_BLOCK_BYTES);
    return 0;
}

static int ${p}_disk_write(uint64_t block_no, const uint8_t *buf, void *ctx)
{
    (void)ctx;
    if (block_no >= ${P}_ENTRIES + 2u) {
        return -1;
    }
    memcpy(${p}_disk[block_no], buf, ${P}_BLOCK_BYTES);
    return 0;
}

int ${p}_selftest(void)
{
    static ${p}_t c;
    uint64_t b;
    uint8_t *data;

    ${p}_init(&c);
    for (b = 0; b < ${P}_ENTRIES + 2u; b++) {
        memset(${p}_disk[b], (int)b, ${P}_BLOCK_BYTES);
    }
    for (b = 0; b < ${P}_ENTRIES; b++) {
        data = ${p}_get(&c, b, ${p}_disk_read, ${p}_disk_write, NULL);
        if (data == NULL || data[0] != (uint8_t)b) {
            return 1;
        }
    }
    if (${p}_get(&c, 0, ${p}_disk_read, ${p}_disk_write, NULL) == NULL || c.hits != 1u ||
        c.misses != ${P}_ENTRIES) {
        return 2;
    }
    data = ${p}_get(&c, ${P}_ENTRIES, ${p}_disk_read, ${p}_disk_write, NULL);
    if (data == NULL || ${p}_lookup(&c, 1) != NULL || ${p}_lookup(&c, 0) == NULL) {
        return 3;
    }
    data = ${p}_get(&c, 0, ${p}_disk_read, ${p}_disk_write, NULL);
    data[0] = 0xAB;
    if (${p}_mark_dirty(&c, 0) != 0 || ${p}_flush(&c, ${p}_disk_write, NULL) != 0) {
        return 4;
    }
    if (${p}_disk[0][0] != 0xAB || c.writebacks != 1u || ${p}_mark_dirty(&c, 1) != -1) {
        return 5;
    }
    if (${p}_get(&c, ${P}_ENTRIES + 5u, ${p}_disk_read, ${p}_disk_write, NULL) != NULL) {
        return 6;
    }
    return 0;
}
"""


def _file_cache(prefix: str, rng: random.Random) -> _Piece:
    entries = rng.choice((4, 8, 16, 32))
    block_bytes = rng.choice((64, 128, 512))
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h", "stdint.h", "string.h"}),
        body=_render(_CACHE, prefix, entries=entries, block_bytes=block_bytes),
        selftest=f"{prefix}_selftest",
        tests=("lru_eviction", "hit_accounting", "dirty_write_back", "device_error_propagates"),
        summary=f"LRU block cache, {entries} x {block_bytes} bytes, write-back",
    )


_NETSTACK = """
/* The bottom of an IPv4 stack: header build/parse with checksum validation,
 * and a port table that demultiplexes datagrams to sockets. */
#define ${P}_MAX_BINDINGS ${bindings}u
#define ${P}_HEADER_LEN 20u

typedef struct {
    uint8_t ttl;
    uint8_t protocol;
    uint16_t total_length;
    uint16_t id;
    uint32_t src;
    uint32_t dst;
} ${p}_ipv4;

typedef struct {
    uint16_t port[${P}_MAX_BINDINGS];
    int socket_id[${P}_MAX_BINDINGS];
    size_t count;
} ${p}_ports;

uint16_t ${p}_checksum(const uint8_t *buf, size_t len)
{
    uint32_t sum = 0;
    size_t i;
    for (i = 0; i + 1 < len; i += 2) {
        sum += (uint32_t)((buf[i] << 8) | buf[i + 1]);
    }
    if (len & 1u) {
        sum += (uint32_t)(buf[len - 1] << 8);
    }
    while (sum >> 16) {
        sum = (sum & 0xFFFFu) + (sum >> 16);
    }
    return (uint16_t)~sum;
}

static void ${p}_put16(uint8_t *at, uint16_t v)
{
    at[0] = (uint8_t)(v >> 8);
    at[1] = (uint8_t)(v & 0xFFu);
}

static void ${p}_put32(uint8_t *at, uint32_t v)
{
    ${p}_put16(at, (uint16_t)(v >> 16));
    ${p}_put16(at + 2, (uint16_t)(v & 0xFFFFu));
}

static uint16_t ${p}_get16(const uint8_t *at)
{
    return (uint16_t)((at[0] << 8) | at[1]);
}

static uint32_t ${p}_get32(const uint8_t *at)
{
    return ((uint32_t)${p}_get16(at) << 16) | ${p}_get16(at + 2);
}

int ${p}_ipv4_build(uint8_t *buf, size_t cap, const ${p}_ipv4 *h)
{
    if (cap < ${P}_HEADER_LEN || h->total_length < ${P}_HEADER_LEN) {
        return -1;
    }
    memset(buf, 0, ${P}_HEADER_LEN);
    buf[0] = 0x45; /* version 4, five 32-bit words */
    ${p}_put16(buf + 2, h->total_length);
    ${p}_put16(buf + 4, h->id);
    buf[8] = h->ttl;
    buf[9] = h->protocol;
    ${p}_put32(buf + 12, h->src);
    ${p}_put32(buf + 16, h->dst);
    ${p}_put16(buf + 10, ${p}_checksum(buf, ${P}_HEADER_LEN));
    return (int)${P}_HEADER_LEN;
}

/* Returns the header length, or -1 for anything a router would drop. */
int ${p}_ipv4_parse(const uint8_t *buf, size_t len, ${p}_ipv4 *out)
{
    size_t ihl;
    if (len < ${P}_HEADER_LEN || (buf[0] >> 4) != 4u) {
        return -1;
    }
    ihl = (size_t)(buf[0] & 0x0Fu) * 4u;
    if (ihl < ${P}_HEADER_LEN || ihl > len || ${p}_checksum(buf, ihl) != 0u) {
        return -1;
    }
    out->total_length = ${p}_get16(buf + 2);
    if (out->total_length < ihl || out->total_length > len) {
        return -1;
    }
    out->id = ${p}_get16(buf + 4);
    out->ttl = buf[8];
    out->protocol = buf[9];
    out->src = ${p}_get32(buf + 12);
    out->dst = ${p}_get32(buf + 16);
    return (int)ihl;
}

int ${p}_bind(${p}_ports *t, uint16_t port, int socket_id)
{
    size_t i;
    if (port == 0u || t->count == ${P}_MAX_BINDINGS) {
        return -1;
    }
    for (i = 0; i < t->count; i++) {
        if (t->port[i] == port) {
            return -1;
        }
    }
    t->port[t->count] = port;
    t->socket_id[t->count] = socket_id;
    t->count++;
    return 0;
}

int ${p}_demux(const ${p}_ports *t, uint16_t port)
{
    size_t i;
    for (i = 0; i < t->count; i++) {
        if (t->port[i] == port) {
            return t->socket_id[i];
        }
    }
    return -1;
}

int ${p}_selftest(void)
{
    static ${p}_ports ports;
    uint8_t pkt[64];
    ${p}_ipv4 h;
    ${p}_ipv4 parsed;

    h.ttl = ${ttl};
    h.protocol = 17;
    h.total_length = 48;
    h.id = 0x${ident};
    h.src = 0x0A000001u;
    h.dst = 0xC0A80101u;
    if (${p}_ipv4_build(pkt, sizeof pkt, &h) != 20) {
        return 1;
    }
    if (${p}_ipv4_parse(pkt, sizeof pkt, &parsed) != 20 || parsed.src != h.src || parsed.dst != h.dst ||
        parsed.ttl != h.ttl || parsed.id != h.id || parsed.total_length != 48) {
        return 2;
    }
    pkt[8] ^= 0x10u;
    if (${p}_ipv4_parse(pkt, sizeof pkt, &parsed) != -1) {
        return 3;
    }
    ports.count = 0;
    if (${p}_bind(&ports, ${port}, 3) != 0 || ${p}_bind(&ports, ${port}, 4) != -1) {
        return 4;
    }
    return ${p}_demux(&ports, ${port}) == 3 && ${p}_demux(&ports, 1) == -1 ? 0 : 5;
}
"""


def _network_stack(prefix: str, rng: random.Random) -> _Piece:
    bindings = rng.choice((8, 16, 64))
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h", "stdint.h", "string.h"}),
        body=_render(
            _NETSTACK,
            prefix,
            bindings=bindings,
            ttl=rng.choice((32, 64, 128, 255)),
            ident=f"{rng.randrange(0x10000):04X}",
            port=rng.choice((53, 67, 123, 514, 5353, 8080)),
        ),
        selftest=f"{prefix}_selftest",
        tests=("ipv4_roundtrip", "corrupt_header_dropped", "port_demux", "duplicate_bind_refused"),
        summary=f"IPv4 header codec and port demux, bindings<={bindings}",
    )


_GPU = """
/* A minimal display driver: two scanout buffers, drawing always goes to the
 * back buffer, and a requested page flip only happens at vertical blank so
 * the screen never shows a half-drawn frame. */
#define ${P}_WIDTH ${width}
#define ${P}_HEIGHT ${height}

typedef struct {
    uint32_t buffers[2][${P}_WIDTH * ${P}_HEIGHT];
    int front;
    int flip_pending;
    unsigned long flips;
    unsigned long vblanks;
} ${p}_device;

void ${p}_init(${p}_device *dev)
{
    memset(dev, 0, sizeof *dev);
}

uint32_t *${p}_back_buffer(${p}_device *dev)
{
    return dev->buffers[1 - dev->front];
}

uint32_t ${p}_scanout_pixel(const ${p}_device *dev, int x, int y)
{
    if (x < 0 || y < 0 || x >= ${P}_WIDTH || y >= ${P}_HEIGHT) {
        return 0;
    }
    return dev->buffers[dev->front][y * ${P}_WIDTH + x];
}

void ${p}_fill_rect(${p}_device *dev, int x, int y, int w, int h, uint32_t color)
{
    uint32_t *back = ${p}_back_buffer(dev);
    int x1 = x + w;
    int y1 = y + h;
    int i;
    int j;
    x = x < 0 ? 0 : x;
    y = y < 0 ? 0 : y;
    x1 = x1 > ${P}_WIDTH ? ${P}_WIDTH : x1;
    y1 = y1 > ${P}_HEIGHT ? ${P}_HEIGHT : y1;
    for (j = y; j < y1; j++) {
        for (i = x; i < x1; i++) {
            back[j * ${P}_WIDTH + i] = color;
        }
    }
}

int ${p}_request_flip(${p}_device *dev)
{
    if (dev->flip_pending) {
        return -1;
    }
    dev->flip_pending = 1;
    return 0;
}

void ${p}_vblank(${p}_device *dev)
{
    dev->vblanks++;
    if (dev->flip_pending) {
        dev->front = 1 - dev->front;
        dev->flip_pending = 0;
        dev->flips++;
    }
}

int ${p}_selftest(void)
{
    static ${p}_device dev;

    ${p}_init(&dev);
    ${p}_fill_rect(&dev, -5, -5, 10, 10, 0x${color}u);
    if (${p}_scanout_pixel(&dev, 0, 0) != 0u) {
        return 1;
    }
    if (${p}_request_flip(&dev) != 0 || ${p}_request_flip(&dev) != -1) {
        return 2;
    }
    ${p}_vblank(&dev);
    if (${p}_scanout_pixel(&dev, 0, 0) != 0x${color}u || ${p}_scanout_pixel(&dev, 5, 5) != 0u) {
        return 3;
    }
    ${p}_fill_rect(&dev, ${P}_WIDTH - 2, ${P}_HEIGHT - 2, 10, 10, 0xFFFFFFFFu);
    ${p}_vblank(&dev);
    if (dev.flips != 1u || dev.vblanks != 2u || ${p}_scanout_pixel(&dev, ${P}_WIDTH - 1, ${P}_HEIGHT - 1) != 0u) {
        return 4;
    }
    return ${p}_scanout_pixel(&dev, ${P}_WIDTH, 0) == 0u ? 0 : 5;
}
"""


def _graphics_driver(prefix: str, rng: random.Random) -> _Piece:
    width = rng.choice((64, 80, 128))
    height = rng.choice((48, 60, 96))
    color = f"FF{rng.randrange(1, 0x1000000):06X}"
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stdint.h", "string.h"}),
        body=_render(_GPU, prefix, width=width, height=height, color=color),
        selftest=f"{prefix}_selftest",
        tests=("draws_to_back_buffer", "flip_waits_for_vblank", "fill_rect_clips"),
        summary=f"double-buffered display driver, {width}x{height}",
    )


_AUDIO_MIXER = """
/* Voice mixer for a sound server: a fixed set of voices, each with its own
 * volume that ramps toward its target one step per frame (no zipper noise on
 * volume changes), mute, and a master gain; finished voices free themselves. */
#define ${P}_VOICES ${voices}u
#define ${P}_RAMP_STEP ${ramp}u
#define ${P}_UNITY 256u

typedef struct {
    const int16_t *samples;
    size_t length;
    size_t position;
    uint16_t volume;
    uint16_t target;
    int muted;
    int active;
} ${p}_voice;

typedef struct {
    ${p}_voice voices[${P}_VOICES];
    uint16_t master;
} ${p}_t;

void ${p}_init(${p}_t *m)
{
    memset(m, 0, sizeof *m);
    m->master = ${P}_UNITY;
}

int ${p}_play(${p}_t *m, const int16_t *samples, size_t length, uint16_t volume)
{
    size_t i;
    for (i = 0; i < ${P}_VOICES; i++) {
        ${p}_voice *v = &m->voices[i];
        if (!v->active) {
            v->samples = samples;
            v->length = length;
            v->position = 0;
            v->volume = volume;
            v->target = volume;
            v->muted = 0;
            v->active = length > 0u;
            return (int)i;
        }
    }
    return -1;
}

void ${p}_set_volume(${p}_t *m, int voice, uint16_t target)
{
    if (voice >= 0 && (size_t)voice < ${P}_VOICES) {
        m->voices[voice].target = target;
    }
}

static int16_t ${p}_clip(int32_t v)
{
    return v > INT16_MAX ? INT16_MAX : (v < INT16_MIN ? INT16_MIN : (int16_t)v);
}

/* Mixes `frames` frames into out and returns how many voices are still playing. */
size_t ${p}_render(${p}_t *m, int16_t *out, size_t frames)
{
    size_t f;
    size_t i;
    size_t playing = 0;
    for (f = 0; f < frames; f++) {
        int32_t acc = 0;
        for (i = 0; i < ${P}_VOICES; i++) {
            ${p}_voice *v = &m->voices[i];
            if (!v->active) {
                continue;
            }
            if (v->volume < v->target) {
                unsigned gap = (unsigned)(v->target - v->volume);
                v->volume = (uint16_t)(gap < ${P}_RAMP_STEP ? v->target : v->volume + ${P}_RAMP_STEP);
            } else if (v->volume > v->target) {
                unsigned gap = (unsigned)(v->volume - v->target);
                v->volume = (uint16_t)(gap < ${P}_RAMP_STEP ? v->target : v->volume - ${P}_RAMP_STEP);
            }
            if (!v->muted) {
                acc += (int32_t)v->samples[v->position] * (int32_t)v->volume / (int32_t)${P}_UNITY;
            }
            if (++v->position == v->length) {
                v->active = 0;
            }
        }
        out[f] = ${p}_clip(acc * (int32_t)m->master / (int32_t)${P}_UNITY);
    }
    for (i = 0; i < ${P}_VOICES; i++) {
        playing += m->voices[i].active ? 1u : 0u;
    }
    return playing;
}

int ${p}_selftest(void)
{
    static ${p}_t m;
    static int16_t loud[8];
    static int16_t quiet[4];
    int16_t out[8];
    int a;
    int b;
    size_t i;

    for (i = 0; i < 8; i++) {
        loud[i] = 20000;
    }
    for (i = 0; i < 4; i++) {
        quiet[i] = 1000;
    }
    ${p}_init(&m);
    a = ${p}_play(&m, loud, 8, ${P}_UNITY);
    b = ${p}_play(&m, quiet, 4, ${P}_UNITY);
    if (a < 0 || b < 0 || a == b) {
        return 1;
    }
    if (${p}_render(&m, out, 2) != 2u || out[0] != 21000) {
        return 2;
    }
    m.voices[a].muted = 1;
    if (${p}_render(&m, out, 2) != 1u || out[0] != 1000) {
        return 3;
    }
    m.voices[a].muted = 0;
    ${p}_set_volume(&m, a, 0);
    ${p}_render(&m, out, 4);
    if (m.voices[a].active || m.voices[a].volume >= ${P}_UNITY) {
        return 4;
    }
    m.master = 2u * ${P}_UNITY;
    a = ${p}_play(&m, loud, 8, ${P}_UNITY);
    ${p}_render(&m, out, 1);
    return out[0] == INT16_MAX ? 0 : 5;
}
"""


def _audio_mixer(prefix: str, rng: random.Random) -> _Piece:
    voices = rng.choice((4, 8, 16, 32))
    ramp = rng.choice((8, 16, 32))
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h", "stdint.h", "string.h"}),
        body=_render(_AUDIO_MIXER, prefix, voices=voices, ramp=ramp),
        selftest=f"{prefix}_selftest",
        tests=(
            "mixes_voices",
            "mute",
            "volume_ramp",
            "master_gain_clips",
            "voices_free_themselves",
        ),
        summary=f"voice mixer with volume ramps, voices={voices}, ramp={ramp}",
    )


_SECMOD = """
/* Authentication gate for a security module: constant-time secret check,
 * lockout after repeated failures (per subject, for a number of ticks), and a
 * bounded audit ring that keeps the latest decisions. */
#define ${P}_MAX_SUBJECTS ${subjects}u
#define ${P}_MAX_FAILURES ${max_failures}u
#define ${P}_LOCKOUT_TICKS ${lockout}ul
#define ${P}_AUDIT_SIZE ${audit}u

typedef struct {
    uint32_t uid;
    unsigned failures;
    unsigned long locked_until;
} ${p}_subject;

typedef struct {
    uint32_t uid;
    int result;
    unsigned long tick;
} ${p}_audit_record;

typedef struct {
    ${p}_subject subjects[${P}_MAX_SUBJECTS];
    size_t n_subjects;
    ${p}_audit_record audit[${P}_AUDIT_SIZE];
    size_t audit_next;
    size_t audit_count;
    unsigned long now;
} ${p}_t;

int ${p}_ct_equal(const uint8_t *a, const uint8_t *b, size_t len)
{
    volatile uint8_t diff = 0;
    size_t i;
    for (i = 0; i < len; i++) {
        diff |= (uint8_t)(a[i] ^ b[i]);
    }
    return diff == 0;
}

void ${p}_init(${p}_t *m)
{
    memset(m, 0, sizeof *m);
}

void ${p}_tick(${p}_t *m, unsigned long ticks)
{
    m->now += ticks;
}

static ${p}_subject *${p}_subject_for(${p}_t *m, uint32_t uid)
{
    size_t i;
    for (i = 0; i < m->n_subjects; i++) {
        if (m->subjects[i].uid == uid) {
            return &m->subjects[i];
        }
    }
    if (m->n_subjects == ${P}_MAX_SUBJECTS) {
        return NULL;
    }
    m->subjects[m->n_subjects].uid = uid;
    m->subjects[m->n_subjects].failures = 0;
    m->subjects[m->n_subjects].locked_until = 0;
    return &m->subjects[m->n_subjects++];
}

static int ${p}_record(${p}_t *m, uint32_t uid, int result)
{
    ${p}_audit_record *r = &m->audit[m->audit_next];
    r->uid = uid;
    r->result = result;
    r->tick = m->now;
    m->audit_next = (m->audit_next + 1u) % ${P}_AUDIT_SIZE;
    if (m->audit_count < ${P}_AUDIT_SIZE) {
        m->audit_count++;
    }
    return result;
}

/* 0: authenticated; -1: wrong secret; -2: locked out; -3: subject table full. */
int ${p}_authenticate(${p}_t *m, uint32_t uid, const uint8_t *secret, const uint8_t *expected, size_t len)
{
    ${p}_subject *s = ${p}_subject_for(m, uid);
    if (s == NULL) {
        return ${p}_record(m, uid, -3);
    }
    if (m->now < s->locked_until) {
        return ${p}_record(m, uid, -2);
    }
    if (!${p}_ct_equal(secret, expected, len)) {
        if (++s->failures >= ${P}_MAX_FAILURES) {
            s->failures = 0;
            s->locked_until = m->now + ${P}_LOCKOUT_TICKS;
        }
        return ${p}_record(m, uid, -1);
    }
    s->failures = 0;
    return ${p}_record(m, uid, 0);
}

int ${p}_selftest(void)
{
    static ${p}_t m;
    static const uint8_t secret[8] = {${secret}};
    uint8_t wrong[8];
    unsigned i;

    memcpy(wrong, secret, sizeof wrong);
    wrong[3] ^= 0x5Au;
    ${p}_init(&m);
    if (${p}_authenticate(&m, 42u, secret, secret, sizeof secret) != 0) {
        return 1;
    }
    for (i = 0; i < ${P}_MAX_FAILURES; i++) {
        if (${p}_authenticate(&m, 42u, wrong, secret, sizeof secret) != -1) {
            return 2;
        }
    }
    if (${p}_authenticate(&m, 42u, secret, secret, sizeof secret) != -2) {
        return 3;
    }
    ${p}_tick(&m, ${P}_LOCKOUT_TICKS);
    if (${p}_authenticate(&m, 42u, secret, secret, sizeof secret) != 0) {
        return 4;
    }
    if (m.audit_count != (${P}_MAX_FAILURES + 3u < ${P}_AUDIT_SIZE ? ${P}_MAX_FAILURES + 3u : ${P}_AUDIT_SIZE)) {
        return 5;
    }
    for (i = 0; i < ${P}_MAX_SUBJECTS; i++) {
        (void)${p}_authenticate(&m, 1000u + i, secret, secret, sizeof secret);
    }
    return ${p}_authenticate(&m, 999999u, secret, secret, sizeof secret) == -3 ? 0 : 6;
}
"""


def _security_module(prefix: str, rng: random.Random) -> _Piece:
    subjects = rng.choice((8, 16, 64))
    max_failures = rng.choice((3, 5))
    secret = ", ".join(f"0x{rng.randrange(256):02x}" for _ in range(8))
    return _Piece(
        prefix=prefix,
        includes=frozenset({"stddef.h", "stdint.h", "string.h"}),
        body=_render(
            _SECMOD,
            prefix,
            subjects=subjects,
            max_failures=max_failures,
            lockout=rng.choice((10, 30, 60)),
            audit=rng.choice((4, 16, 64)),
            secret=secret,
        ),
        selftest=f"{prefix}_selftest",
        tests=(
            "authenticates",
            "locks_out_after_failures",
            "lockout_expires",
            "audit_ring_bounded",
        ),
        summary=f"authentication gate with lockout, subjects<={subjects}, failures<{max_failures}",
    )


# ---------------------------------------------------------------------------
# Tables and public API
# ---------------------------------------------------------------------------

# Each specialization: its module kind, a few plausible identifier stems, the maker.
_MODULES: Final[Mapping[str, tuple[str, tuple[str, ...], _PieceMaker]]] = MappingProxyType(
    {
        "networking": ("packet_ring", ("rx_ring", "pkt_ring", "net_ring"), _ring_buffer),
        "file_system": (
            "block_allocator",
            ("blk_bitmap", "fs_balloc", "extent_map"),
            _bitmap_allocator,
        ),
        "process_manager": ("run_queue", ("runq", "rr_sched", "sched_rq"), _run_queue),
        "security": ("access_control", ("acl", "sec_acl", "access"), _access_control),
        "graphics": ("blitter", ("gfx", "blit", "compositor"), _framebuffer_blit),
        "audio": ("pcm_mixer", ("pcm", "mixer", "snd_mix"), _pcm_mixer),
        "window_manager": ("damage_tracker", ("damage", "wm_damage", "dmg"), _damage_tracker),
        "performance": ("latency_tracker", ("lat", "perf_lat", "latency"), _latency_tracker),
    }
)

_FEATURES: Final[Mapping[str, tuple[tuple[str, ...], _PieceMaker]]] = MappingProxyType(
    {
        "memory_allocator": (("kpool", "slab", "blkpool"), _memory_allocator),
        "file_cache": (("bcache", "fcache", "lru_cache"), _file_cache),
        "network_stack": (("ip4", "netstk", "inet"), _network_stack),
        "graphics_driver": (("gpu", "disp", "fbdev"), _graphics_driver),
        "audio_mixer": (("voicemix", "amix", "sndsrv"), _audio_mixer),
        "security_module": (("authgate", "secmod", "lsm"), _security_module),
    }
)

FEATURES: Final[tuple[str, ...]] = tuple(_FEATURES)


def _unit(name: str, description: str, pieces: list[_Piece], extra: str = "") -> str:
    includes = sorted(frozenset[str]().union(*(p.includes for p in pieces)))
    lines = [
        f"/* {name}: {description}",
        " * Generated by the kernelhub trainer: self-contained C99, no entry point. */",
        "",
        *(f"#include <{h}>" for h in includes),
    ]
    body = "\n".join(p.body.strip("\n") + "\n" for p in pieces)
    return "\n".join(lines) + "\n\n" + body + extra


def generate_module(specialization: Specialization, rng: random.Random) -> GeneratedCode:
    """The specialization's signature module (ring buffer for networking, ...)."""
    spec = specialization_name(specialization)
    if spec not in _MODULES:
        raise ValueError(f"no code generator for specialization {spec!r}")
    kind, stems, make = _MODULES[spec]
    piece = make(rng.choice(stems), rng)
    return GeneratedCode(
        name=f"{spec}_module",
        code=_unit(f"{spec}_module", piece.summary, [piece]),
        entry_point=piece.selftest,
        test_cases=tuple(f"test_{kind}_{t}" for t in piece.tests),
        dependencies=("libc",),
    )


def is_known_feature(feature: str) -> bool:
    return feature in _FEATURES


def generate_feature(feature: str, rng: random.Random) -> GeneratedCode:
    """One of FEATURES (what feature requests ask for); ValueError for others."""
    if feature not in _FEATURES:
        raise ValueError(f"no template for feature {feature!r}; known: {', '.join(FEATURES)}")
    stems, make = _FEATURES[feature]
    piece = make(rng.choice(stems), rng)
    return GeneratedCode(
        name=feature,
        code=_unit(feature, piece.summary, [piece]),
        entry_point=piece.selftest,
        test_cases=tuple(f"test_{feature}_{t}" for t in piece.tests),
        dependencies=("libc",),
    )


_GLUE = """
/* Integration layer: both partners' pieces are checked together before the
 * component is offered, and the report says which side failed. */
typedef struct {
    int lead_status;
    int partner_status;
} ${p}_report;

int ${p}_integrate(${p}_report *report)
{
    report->lead_status = ${lead}();
    report->partner_status = ${partner}();
    return report->lead_status == 0 && report->partner_status == 0 ? 0 : -1;
}

int ${p}_selftest(void)
{
    ${p}_report report;
    return ${p}_integrate(&report) == 0 ? 0 : 1;
}
"""


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
    for spec in (lead_name, partner_name):
        if spec not in _MODULES:
            raise ValueError(f"no code generator for specialization {spec!r}")
    lead_kind, lead_stems, make_lead = _MODULES[lead_name]
    partner_kind, partner_stems, make_partner = _MODULES[partner_name]
    lead_piece = make_lead(f"{rng.choice(lead_stems)}_lead", rng)
    partner_piece = make_partner(f"{rng.choice(partner_stems)}_peer", rng)
    glue_prefix = f"collab_{lead_name}_{partner_name}"
    glue = _render(_GLUE, glue_prefix, lead=lead_piece.selftest, partner=partner_piece.selftest)
    description = f"{lead_piece.summary}; with {partner_piece.summary}"
    tests = (
        *(f"test_lead_{lead_kind}_{t}" for t in lead_piece.tests),
        *(f"test_peer_{partner_kind}_{t}" for t in partner_piece.tests),
        f"test_{glue_prefix}_integration",
    )
    return GeneratedCode(
        name=name,
        code=_unit(name, description, [lead_piece, partner_piece], extra=glue),
        entry_point=f"{glue_prefix}_selftest",
        test_cases=tests,
        dependencies=(f"{lead_name}_module", f"{partner_name}_module"),
    )
