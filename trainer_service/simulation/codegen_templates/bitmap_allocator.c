/* Template for the file-system module: a free-block bitmap allocator.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stdint.h>
#include <string.h>

#ifndef BLOCKS
#define BLOCKS 256u
#endif
#ifndef VICTIM
#define VICTIM 17
#endif
#ifndef WITH_EXTENT
#define WITH_EXTENT 1
#endif
/* ---- template body ---- */
/* Free-block bitmap for an on-disk allocation group: one bit per block, a
 * running free count so "disk full" is O(1), and a search hint so allocation
 * does not rescan the full words at the front every time. */
#define PREFIX_BLOCKS BLOCKS
#define PREFIX_WORDS (PREFIX_BLOCKS / 32u)

typedef struct {
    uint32_t bits[PREFIX_WORDS];
    uint32_t free_count;
    uint32_t hint;
} prefix_t;

void prefix_init(prefix_t *bm)
{
    memset(bm->bits, 0, sizeof bm->bits);
    bm->free_count = PREFIX_BLOCKS;
    bm->hint = 0;
}

long prefix_alloc(prefix_t *bm)
{
    uint32_t scanned;
    if (bm->free_count == 0u) {
        return -1;
    }
    for (scanned = 0; scanned < PREFIX_WORDS; scanned++) {
        uint32_t w = (bm->hint + scanned) % PREFIX_WORDS;
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

int prefix_is_allocated(const prefix_t *bm, long block)
{
    if (block < 0 || block >= (long)PREFIX_BLOCKS) {
        return 0;
    }
    return (bm->bits[(uint32_t)block / 32u] >> ((uint32_t)block % 32u)) & 1u;
}

/* Returns -1 for out-of-range blocks and double frees instead of corrupting the count. */
int prefix_free(prefix_t *bm, long block)
{
    uint32_t w;
    uint32_t mask;
    if (!prefix_is_allocated(bm, block)) {
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
#if WITH_EXTENT

/* Contiguous run of `count` free blocks, first fit; -1 when none is long enough. */
long prefix_alloc_extent(prefix_t *bm, uint32_t count)
{
    uint32_t start = 0;
    uint32_t run = 0;
    uint32_t b;
    if (count == 0u || count > bm->free_count) {
        return -1;
    }
    for (b = 0; b < PREFIX_BLOCKS; b++) {
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
#endif

int prefix_selftest(void)
{
    static prefix_t bm;
    long i;

    prefix_init(&bm);
    for (i = 0; i < (long)PREFIX_BLOCKS; i++) {
        if (prefix_alloc(&bm) != i) {
            return 1;
        }
    }
    if (prefix_alloc(&bm) != -1 || bm.free_count != 0u) {
        return 2;
    }
    if (prefix_free(&bm, VICTIM) != 0 || prefix_free(&bm, VICTIM) != -1) {
        return 3;
    }
    if (prefix_alloc(&bm) != VICTIM) {
        return 4;
    }
    if (prefix_free(&bm, -1) != -1 || prefix_free(&bm, (long)PREFIX_BLOCKS) != -1) {
        return 5;
    }
#if WITH_EXTENT

    for (i = 10; i < 20; i++) {
        if (prefix_free(&bm, i) != 0) {
            return 6;
        }
    }
    if (prefix_alloc_extent(&bm, 4) != 10 || prefix_alloc_extent(&bm, 7) != -1) {
        return 7;
    }
#endif
    return 0;
}
