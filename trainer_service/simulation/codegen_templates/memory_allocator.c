/* Template for the memory_allocator feature: a fixed-size block pool.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef BLOCK_SIZE
#define BLOCK_SIZE 32u
#endif
#ifndef BLOCK_COUNT
#define BLOCK_COUNT 16u
#endif
#ifndef VICTIM
#define VICTIM 5
#endif
/* ---- template body ---- */
/* Fixed-size block pool: O(1) alloc/free from an intrusive free list threaded
 * through the unused blocks, with the pointer validated on free so a stray
 * pointer or a double free is refused instead of corrupting the list. */
#define PREFIX_BLOCK_SIZE BLOCK_SIZE
#define PREFIX_BLOCK_COUNT BLOCK_COUNT

typedef union prefix_block {
    union prefix_block *next;
    unsigned char bytes[PREFIX_BLOCK_SIZE];
} prefix_block;

typedef struct {
    prefix_block arena[PREFIX_BLOCK_COUNT];
    prefix_block *free_list;
    size_t in_use;
} prefix_t;

void prefix_init(prefix_t *pool)
{
    size_t i;
    pool->free_list = NULL;
    for (i = PREFIX_BLOCK_COUNT; i > 0; i--) {
        pool->arena[i - 1].next = pool->free_list;
        pool->free_list = &pool->arena[i - 1];
    }
    pool->in_use = 0;
}

void *prefix_alloc(prefix_t *pool)
{
    prefix_block *b = pool->free_list;
    if (b == NULL) {
        return NULL;
    }
    pool->free_list = b->next;
    pool->in_use++;
    return b;
}

int prefix_free(prefix_t *pool, void *ptr)
{
    uintptr_t base = (uintptr_t)pool->arena;
    uintptr_t p = (uintptr_t)ptr;
    prefix_block *b;
    prefix_block *it;
    size_t steps = 0;
    if (ptr == NULL || p < base || p >= base + sizeof pool->arena || (p - base) % sizeof(prefix_block) != 0u) {
        return -1;
    }
    b = &pool->arena[(p - base) / sizeof(prefix_block)];
    for (it = pool->free_list; it != NULL && steps < PREFIX_BLOCK_COUNT; it = it->next, steps++) {
        if (it == b) {
            return -1;
        }
    }
    b->next = pool->free_list;
    pool->free_list = b;
    pool->in_use--;
    return 0;
}

size_t prefix_available(const prefix_t *pool)
{
    return PREFIX_BLOCK_COUNT - pool->in_use;
}

int prefix_selftest(void)
{
    static prefix_t pool;
    static void *held[PREFIX_BLOCK_COUNT];
    size_t i;
    void *again;

    prefix_init(&pool);
    for (i = 0; i < PREFIX_BLOCK_COUNT; i++) {
        held[i] = prefix_alloc(&pool);
        if (held[i] == NULL) {
            return 1;
        }
        memset(held[i], (int)(i & 0xFFu), PREFIX_BLOCK_SIZE);
    }
    if (prefix_alloc(&pool) != NULL || prefix_available(&pool) != 0u) {
        return 2;
    }
    if (prefix_free(&pool, held[VICTIM]) != 0 || prefix_free(&pool, held[VICTIM]) != -1) {
        return 3;
    }
    again = prefix_alloc(&pool);
    if (again != held[VICTIM]) {
        return 4;
    }
    if (prefix_free(&pool, (unsigned char *)held[0] + 1) != -1 || prefix_free(&pool, NULL) != -1) {
        return 5;
    }
    for (i = 0; i < PREFIX_BLOCK_COUNT; i++) {
        if (prefix_free(&pool, held[i]) != 0) {
            return 6;
        }
    }
    return prefix_available(&pool) == PREFIX_BLOCK_COUNT ? 0 : 7;
}
