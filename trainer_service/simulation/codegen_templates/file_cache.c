/* Template for the file_cache feature: an LRU write-back block cache.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef ENTRIES
#define ENTRIES 4u
#endif
#ifndef BLOCK_BYTES
#define BLOCK_BYTES 64u
#endif
/* ---- template body ---- */
/* Block cache in front of a slow device: fixed slots, least-recently-used
 * eviction, and write-back of dirty blocks on eviction or flush. The device is
 * reached through callbacks so the cache is testable without one. */
#define PREFIX_ENTRIES ENTRIES
#define PREFIX_BLOCK_BYTES BLOCK_BYTES

typedef int (*prefix_read_fn)(uint64_t block_no, uint8_t *buf, void *ctx);
typedef int (*prefix_write_fn)(uint64_t block_no, const uint8_t *buf, void *ctx);

typedef struct {
    uint64_t block_no;
    unsigned long last_used;
    int valid;
    int dirty;
    uint8_t data[PREFIX_BLOCK_BYTES];
} prefix_entry;

typedef struct {
    prefix_entry entries[PREFIX_ENTRIES];
    unsigned long clock;
    unsigned long hits;
    unsigned long misses;
    unsigned long writebacks;
} prefix_t;

void prefix_init(prefix_t *c)
{
    memset(c, 0, sizeof *c);
}

prefix_entry *prefix_lookup(prefix_t *c, uint64_t block_no)
{
    size_t i;
    for (i = 0; i < PREFIX_ENTRIES; i++) {
        if (c->entries[i].valid && c->entries[i].block_no == block_no) {
            return &c->entries[i];
        }
    }
    return NULL;
}

uint8_t *prefix_get(prefix_t *c, uint64_t block_no, prefix_read_fn read, prefix_write_fn write, void *ctx)
{
    prefix_entry *e = prefix_lookup(c, block_no);
    size_t i;
    c->clock++;
    if (e != NULL) {
        c->hits++;
        e->last_used = c->clock;
        return e->data;
    }
    c->misses++;
    e = &c->entries[0];
    for (i = 0; i < PREFIX_ENTRIES; i++) {
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

int prefix_mark_dirty(prefix_t *c, uint64_t block_no)
{
    prefix_entry *e = prefix_lookup(c, block_no);
    if (e == NULL) {
        return -1;
    }
    e->dirty = 1;
    return 0;
}

int prefix_flush(prefix_t *c, prefix_write_fn write, void *ctx)
{
    size_t i;
    for (i = 0; i < PREFIX_ENTRIES; i++) {
        prefix_entry *e = &c->entries[i];
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

static uint8_t prefix_disk[PREFIX_ENTRIES + 2u][PREFIX_BLOCK_BYTES];

static int prefix_disk_read(uint64_t block_no, uint8_t *buf, void *ctx)
{
    (void)ctx;
    if (block_no >= PREFIX_ENTRIES + 2u) {
        return -1;
    }
    memcpy(buf, prefix_disk[block_no], PREFIX_BLOCK_BYTES);
    return 0;
}

static int prefix_disk_write(uint64_t block_no, const uint8_t *buf, void *ctx)
{
    (void)ctx;
    if (block_no >= PREFIX_ENTRIES + 2u) {
        return -1;
    }
    memcpy(prefix_disk[block_no], buf, PREFIX_BLOCK_BYTES);
    return 0;
}

int prefix_selftest(void)
{
    static prefix_t c;
    uint64_t b;
    uint8_t *data;

    prefix_init(&c);
    for (b = 0; b < PREFIX_ENTRIES + 2u; b++) {
        memset(prefix_disk[b], (int)b, PREFIX_BLOCK_BYTES);
    }
    for (b = 0; b < PREFIX_ENTRIES; b++) {
        data = prefix_get(&c, b, prefix_disk_read, prefix_disk_write, NULL);
        if (data == NULL || data[0] != (uint8_t)b) {
            return 1;
        }
    }
    if (prefix_get(&c, 0, prefix_disk_read, prefix_disk_write, NULL) == NULL || c.hits != 1u ||
        c.misses != PREFIX_ENTRIES) {
        return 2;
    }
    data = prefix_get(&c, PREFIX_ENTRIES, prefix_disk_read, prefix_disk_write, NULL);
    if (data == NULL || prefix_lookup(&c, 1) != NULL || prefix_lookup(&c, 0) == NULL) {
        return 3;
    }
    data = prefix_get(&c, 0, prefix_disk_read, prefix_disk_write, NULL);
    data[0] = 0xAB;
    if (prefix_mark_dirty(&c, 0) != 0 || prefix_flush(&c, prefix_disk_write, NULL) != 0) {
        return 4;
    }
    if (prefix_disk[0][0] != 0xAB || c.writebacks != 1u || prefix_mark_dirty(&c, 1) != -1) {
        return 5;
    }
    if (prefix_get(&c, PREFIX_ENTRIES + 5u, prefix_disk_read, prefix_disk_write, NULL) != NULL) {
        return 6;
    }
    return 0;
}
