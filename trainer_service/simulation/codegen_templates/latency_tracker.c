/* Template for the performance module: a moving-average latency tracker.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef WINDOW
#define WINDOW 8u
#endif
#ifndef EWMA_SHIFT
#define EWMA_SHIFT 2u
#endif
#ifndef WITH_PERCENTILE
#define WITH_PERCENTILE 1
#endif
/* ---- template body ---- */
/* Moving-average latency tracker: a fixed window of the latest samples with a
 * running sum, so the average is O(1) per sample, plus an EWMA that reacts
 * faster to a sudden regression than the window does. */
#define PREFIX_WINDOW WINDOW
#define PREFIX_EWMA_SHIFT EWMA_SHIFT

typedef struct {
    uint32_t samples[PREFIX_WINDOW];
    size_t next;
    size_t count;
    uint64_t sum;
    uint32_t max_seen;
    uint32_t ewma;
} prefix_t;

void prefix_init(prefix_t *t)
{
    memset(t, 0, sizeof *t);
}

void prefix_record(prefix_t *t, uint32_t latency_us)
{
    if (t->count == PREFIX_WINDOW) {
        t->sum -= t->samples[t->next];
    } else {
        t->count++;
    }
    t->samples[t->next] = latency_us;
    t->sum += latency_us;
    t->next = (t->next + 1u) % PREFIX_WINDOW;
    if (latency_us > t->max_seen) {
        t->max_seen = latency_us;
    }
    if (t->count == 1u) {
        t->ewma = latency_us;
    } else if (latency_us >= t->ewma) {
        t->ewma += (latency_us - t->ewma) >> PREFIX_EWMA_SHIFT;
    } else {
        t->ewma -= (t->ewma - latency_us) >> PREFIX_EWMA_SHIFT;
    }
}

uint32_t prefix_average(const prefix_t *t)
{
    return t->count == 0u ? 0u : (uint32_t)(t->sum / t->count);
}

int prefix_over_budget(const prefix_t *t, uint32_t budget_us)
{
    return prefix_average(t) > budget_us || t->ewma > budget_us;
}
#if WITH_PERCENTILE

/* Nearest-rank percentile over the window (insertion sort of a copy: the
 * window is small and this runs off the hot path). */
uint32_t prefix_percentile(const prefix_t *t, unsigned pct)
{
    uint32_t sorted[PREFIX_WINDOW];
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
#endif

int prefix_selftest(void)
{
    static prefix_t t;
    uint64_t expect = 0;
    uint32_t v;

    prefix_init(&t);
    if (prefix_average(&t) != 0u) {
        return 1;
    }
    for (v = 1; v <= 2u * PREFIX_WINDOW; v++) {
        prefix_record(&t, v);
    }
    for (v = PREFIX_WINDOW + 1u; v <= 2u * PREFIX_WINDOW; v++) {
        expect += v;
    }
    if (prefix_average(&t) != (uint32_t)(expect / PREFIX_WINDOW) || t.count != PREFIX_WINDOW) {
        return 2;
    }
    if (t.max_seen != 2u * PREFIX_WINDOW || prefix_over_budget(&t, 4u * PREFIX_WINDOW) ||
        !prefix_over_budget(&t, 1u)) {
        return 3;
    }
#if WITH_PERCENTILE

    if (prefix_percentile(&t, 100) != 2u * PREFIX_WINDOW || prefix_percentile(&t, 0) != PREFIX_WINDOW + 1u) {
        return 4;
    }
#endif
    return 0;
}
