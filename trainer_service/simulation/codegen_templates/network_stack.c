/* Template for the network_stack feature: IPv4 header codec and port demux.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef BINDINGS
#define BINDINGS 8u
#endif
#ifndef TTL
#define TTL 64
#endif
#ifndef IDENT
#define IDENT 0x1234
#endif
#ifndef PORT
#define PORT 53
#endif
/* ---- template body ---- */
/* The bottom of an IPv4 stack: header build/parse with checksum validation,
 * and a port table that demultiplexes datagrams to sockets. */
#define PREFIX_MAX_BINDINGS BINDINGS
#define PREFIX_HEADER_LEN 20u

typedef struct {
    uint8_t ttl;
    uint8_t protocol;
    uint16_t total_length;
    uint16_t id;
    uint32_t src;
    uint32_t dst;
} prefix_ipv4;

typedef struct {
    uint16_t port[PREFIX_MAX_BINDINGS];
    int socket_id[PREFIX_MAX_BINDINGS];
    size_t count;
} prefix_ports;

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

static void prefix_put16(uint8_t *at, uint16_t v)
{
    at[0] = (uint8_t)(v >> 8);
    at[1] = (uint8_t)(v & 0xFFu);
}

static void prefix_put32(uint8_t *at, uint32_t v)
{
    prefix_put16(at, (uint16_t)(v >> 16));
    prefix_put16(at + 2, (uint16_t)(v & 0xFFFFu));
}

static uint16_t prefix_get16(const uint8_t *at)
{
    return (uint16_t)((at[0] << 8) | at[1]);
}

static uint32_t prefix_get32(const uint8_t *at)
{
    return ((uint32_t)prefix_get16(at) << 16) | prefix_get16(at + 2);
}

int prefix_ipv4_build(uint8_t *buf, size_t cap, const prefix_ipv4 *h)
{
    if (cap < PREFIX_HEADER_LEN || h->total_length < PREFIX_HEADER_LEN) {
        return -1;
    }
    memset(buf, 0, PREFIX_HEADER_LEN);
    buf[0] = 0x45; /* version 4, five 32-bit words */
    prefix_put16(buf + 2, h->total_length);
    prefix_put16(buf + 4, h->id);
    buf[8] = h->ttl;
    buf[9] = h->protocol;
    prefix_put32(buf + 12, h->src);
    prefix_put32(buf + 16, h->dst);
    prefix_put16(buf + 10, prefix_checksum(buf, PREFIX_HEADER_LEN));
    return (int)PREFIX_HEADER_LEN;
}

/* Returns the header length, or -1 for anything a router would drop. */
int prefix_ipv4_parse(const uint8_t *buf, size_t len, prefix_ipv4 *out)
{
    size_t ihl;
    if (len < PREFIX_HEADER_LEN || (buf[0] >> 4) != 4u) {
        return -1;
    }
    ihl = (size_t)(buf[0] & 0x0Fu) * 4u;
    if (ihl < PREFIX_HEADER_LEN || ihl > len || prefix_checksum(buf, ihl) != 0u) {
        return -1;
    }
    out->total_length = prefix_get16(buf + 2);
    if (out->total_length < ihl || out->total_length > len) {
        return -1;
    }
    out->id = prefix_get16(buf + 4);
    out->ttl = buf[8];
    out->protocol = buf[9];
    out->src = prefix_get32(buf + 12);
    out->dst = prefix_get32(buf + 16);
    return (int)ihl;
}

int prefix_bind(prefix_ports *t, uint16_t port, int socket_id)
{
    size_t i;
    if (port == 0u || t->count == PREFIX_MAX_BINDINGS) {
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

int prefix_demux(const prefix_ports *t, uint16_t port)
{
    size_t i;
    for (i = 0; i < t->count; i++) {
        if (t->port[i] == port) {
            return t->socket_id[i];
        }
    }
    return -1;
}

int prefix_selftest(void)
{
    static prefix_ports ports;
    uint8_t pkt[64];
    prefix_ipv4 h;
    prefix_ipv4 parsed;

    h.ttl = TTL;
    h.protocol = 17;
    h.total_length = 48;
    h.id = IDENT;
    h.src = 0x0A000001u;
    h.dst = 0xC0A80101u;
    if (prefix_ipv4_build(pkt, sizeof pkt, &h) != 20) {
        return 1;
    }
    if (prefix_ipv4_parse(pkt, sizeof pkt, &parsed) != 20 || parsed.src != h.src || parsed.dst != h.dst ||
        parsed.ttl != h.ttl || parsed.id != h.id || parsed.total_length != 48) {
        return 2;
    }
    pkt[8] ^= 0x10u;
    if (prefix_ipv4_parse(pkt, sizeof pkt, &parsed) != -1) {
        return 3;
    }
    ports.count = 0;
    if (prefix_bind(&ports, PORT, 3) != 0 || prefix_bind(&ports, PORT, 4) != -1) {
        return 4;
    }
    return prefix_demux(&ports, PORT) == 3 && prefix_demux(&ports, 1) == -1 ? 0 : 5;
}
