/* Template for the networking module: a single-producer single-consumer packet ring.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef CAPACITY
#define CAPACITY 64u
#endif
#ifndef CHUNK
#define CHUNK 48
#endif
#ifndef STRIDE
#define STRIDE 3u
#endif
#ifndef COPY_MEMCPY
#define COPY_MEMCPY 1
#endif
#ifndef WITH_CHECKSUM
#define WITH_CHECKSUM 1
#endif
/* ---- template body ---- */
/* Single-producer single-consumer byte ring for a NIC receive path. head and
 * tail run freely and wrap modulo 2^32; the capacity is a power of two so the
 * slot index is a mask. */
#define PREFIX_CAPACITY CAPACITY
#define PREFIX_MASK (PREFIX_CAPACITY - 1u)

typedef struct {
    uint8_t data[PREFIX_CAPACITY];
    uint32_t head;
    uint32_t tail;
} prefix_t;

void prefix_init(prefix_t *ring)
{
    memset(ring, 0, sizeof *ring);
}

size_t prefix_used(const prefix_t *ring)
{
    return (size_t)(ring->head - ring->tail);
}

size_t prefix_space(const prefix_t *ring)
{
    return (size_t)PREFIX_CAPACITY - prefix_used(ring);
}
#if COPY_MEMCPY

size_t prefix_write(prefix_t *ring, const uint8_t *src, size_t len)
{
    size_t space = prefix_space(ring);
    size_t n = len < space ? len : space;
    size_t start = (size_t)(ring->head & PREFIX_MASK);
    size_t first = n < PREFIX_CAPACITY - start ? n : PREFIX_CAPACITY - start;
    memcpy(&ring->data[start], src, first);
    memcpy(&ring->data[0], src + first, n - first);
    ring->head += (uint32_t)n;
    return n;
}

size_t prefix_read(prefix_t *ring, uint8_t *dst, size_t len)
{
    size_t used = prefix_used(ring);
    size_t n = len < used ? len : used;
    size_t start = (size_t)(ring->tail & PREFIX_MASK);
    size_t first = n < PREFIX_CAPACITY - start ? n : PREFIX_CAPACITY - start;
    memcpy(dst, &ring->data[start], first);
    memcpy(dst + first, &ring->data[0], n - first);
    ring->tail += (uint32_t)n;
    return n;
}
#else

size_t prefix_write(prefix_t *ring, const uint8_t *src, size_t len)
{
    size_t space = prefix_space(ring);
    size_t n = len < space ? len : space;
    size_t i;
    for (i = 0; i < n; i++) {
        ring->data[(ring->head + (uint32_t)i) & PREFIX_MASK] = src[i];
    }
    ring->head += (uint32_t)n;
    return n;
}

size_t prefix_read(prefix_t *ring, uint8_t *dst, size_t len)
{
    size_t used = prefix_used(ring);
    size_t n = len < used ? len : used;
    size_t i;
    for (i = 0; i < n; i++) {
        dst[i] = ring->data[(ring->tail + (uint32_t)i) & PREFIX_MASK];
    }
    ring->tail += (uint32_t)n;
    return n;
}
#endif
#if WITH_CHECKSUM

/* RFC 1071 internet checksum over the bytes handed to the ring. */
uint16_t prefix_checksum(const uint8_t *buf, size_t len)
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
#endif

int prefix_selftest(void)
{
    static prefix_t ring;
    uint8_t in[CHUNK];
    uint8_t out[CHUNK];
    size_t i;
    int round;

    prefix_init(&ring);
    for (i = 0; i < sizeof in; i++) {
        in[i] = (uint8_t)(i * STRIDE + 3u);
    }
    for (round = 0; round < 3; round++) {
        if (prefix_write(&ring, in, sizeof in) != sizeof in) {
            return 1;
        }
        if (prefix_read(&ring, out, sizeof out) != sizeof out) {
            return 2;
        }
        if (memcmp(in, out, sizeof in) != 0) {
            return 3;
        }
    }
    if (prefix_write(&ring, in, sizeof in) != sizeof in) {
        return 4;
    }
    if (prefix_write(&ring, in, sizeof in) != PREFIX_CAPACITY - sizeof in || prefix_space(&ring) != 0) {
        return 5;
    }
#if WITH_CHECKSUM

    {
        uint8_t pkt[6] = {0x45, 0x00, 0x00, 0x1c, 0x00, 0x00};
        uint16_t c = prefix_checksum(pkt, 4);
        pkt[4] = (uint8_t)(c >> 8);
        pkt[5] = (uint8_t)(c & 0xFFu);
        if (prefix_checksum(pkt, sizeof pkt) != 0) {
            return 6;
        }
    }
#endif
    return 0;
}
