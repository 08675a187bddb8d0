/* Template for the process-manager module: a round-robin run queue.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>

#ifndef SLOTS
#define SLOTS 16u
#endif
#ifndef QUANTUM
#define QUANTUM 4u
#endif
#ifndef WITH_REMOVE
#define WITH_REMOVE 1
#endif
/* ---- template body ---- */
/* Round-robin run queue: a fixed ring of runnable tasks; each tick runs the
 * head for at most one quantum and puts it back at the tail if work remains. */
#define PREFIX_SLOTS SLOTS

typedef struct {
    int pid;
    unsigned remaining;
    unsigned ran;
} prefix_task;

typedef struct {
    prefix_task slots[PREFIX_SLOTS];
    size_t head;
    size_t count;
    unsigned quantum;
    unsigned long clock;
} prefix_t;

void prefix_init(prefix_t *rq, unsigned quantum)
{
    rq->head = 0;
    rq->count = 0;
    rq->quantum = quantum == 0u ? 1u : quantum;
    rq->clock = 0;
}

int prefix_enqueue(prefix_t *rq, int pid, unsigned work)
{
    prefix_task *slot;
    if (pid <= 0 || work == 0u || rq->count == PREFIX_SLOTS) {
        return -1;
    }
    slot = &rq->slots[(rq->head + rq->count) % PREFIX_SLOTS];
    slot->pid = pid;
    slot->remaining = work;
    slot->ran = 0;
    rq->count++;
    return 0;
}

/* Returns the pid of a task that just finished, 0 if the task ran and was
 * requeued, -1 if nothing is runnable. */
int prefix_tick(prefix_t *rq)
{
    prefix_task task;
    unsigned slice;
    if (rq->count == 0u) {
        return -1;
    }
    task = rq->slots[rq->head];
    rq->head = (rq->head + 1u) % PREFIX_SLOTS;
    rq->count--;
    slice = task.remaining < rq->quantum ? task.remaining : rq->quantum;
    task.remaining -= slice;
    task.ran += slice;
    rq->clock += slice;
    if (task.remaining == 0u) {
        return task.pid;
    }
    rq->slots[(rq->head + rq->count) % PREFIX_SLOTS] = task;
    rq->count++;
    return 0;
}
#if WITH_REMOVE

/* Drops a task (it exited or was killed); keeps everyone else's order. */
int prefix_remove(prefix_t *rq, int pid)
{
    size_t i;
    for (i = 0; i < rq->count; i++) {
        size_t at = (rq->head + i) % PREFIX_SLOTS;
        if (rq->slots[at].pid == pid) {
            size_t j;
            for (j = i; j + 1 < rq->count; j++) {
                rq->slots[(rq->head + j) % PREFIX_SLOTS] = rq->slots[(rq->head + j + 1) % PREFIX_SLOTS];
            }
            rq->count--;
            return 0;
        }
    }
    return -1;
}
#endif

int prefix_selftest(void)
{
    static prefix_t rq;
    int order[3];
    int finished = 0;
    int steps;
    int i;

    prefix_init(&rq, QUANTUM);
    if (prefix_enqueue(&rq, 1, QUANTUM) != 0 || prefix_enqueue(&rq, 2, 3u * QUANTUM) != 0 ||
        prefix_enqueue(&rq, 3, 2u * QUANTUM) != 0) {
        return 1;
    }
    for (steps = 0; steps < 100 && finished < 3; steps++) {
        int pid = prefix_tick(&rq);
        if (pid > 0) {
            order[finished++] = pid;
        }
    }
    if (finished != 3 || order[0] != 1 || order[1] != 3 || order[2] != 2) {
        return 2;
    }
    if (rq.clock != 6ul * QUANTUM || prefix_tick(&rq) != -1) {
        return 3;
    }
    for (i = 0; i < (int)PREFIX_SLOTS; i++) {
        if (prefix_enqueue(&rq, i + 1, 1) != 0) {
            return 4;
        }
    }
    if (prefix_enqueue(&rq, 99, 1) != -1) {
        return 5;
    }
    while (prefix_tick(&rq) > 0) {
    }
#if WITH_REMOVE

    if (prefix_enqueue(&rq, 7, 1) != 0 || prefix_enqueue(&rq, 8, 1) != 0) {
        return 6;
    }
    if (prefix_remove(&rq, 7) != 0 || prefix_remove(&rq, 7) != -1 || prefix_tick(&rq) != 8) {
        return 7;
    }
#endif
    return 0;
}
