/* Template for the security_module feature: an authentication gate with lockout.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef SUBJECTS
#define SUBJECTS 8u
#endif
#ifndef MAX_FAILURES
#define MAX_FAILURES 3u
#endif
#ifndef LOCKOUT_TICKS
#define LOCKOUT_TICKS 10ul
#endif
#ifndef AUDIT_SIZE
#define AUDIT_SIZE 4u
#endif
#ifndef SECRET
#define SECRET 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08
#endif
/* ---- template body ---- */
/* Authentication gate for a security module: constant-time secret check,
 * lockout after repeated failures (per subject, for a number of ticks), and a
 * bounded audit ring that keeps the latest decisions. */
#define PREFIX_MAX_SUBJECTS SUBJECTS
#define PREFIX_MAX_FAILURES MAX_FAILURES
#define PREFIX_LOCKOUT_TICKS LOCKOUT_TICKS
#define PREFIX_AUDIT_SIZE AUDIT_SIZE

typedef struct {
    uint32_t uid;
    unsigned failures;
    unsigned long locked_until;
} prefix_subject;

typedef struct {
    uint32_t uid;
    int result;
    unsigned long tick;
} prefix_audit_record;

typedef struct {
    prefix_subject subjects[PREFIX_MAX_SUBJECTS];
    size_t n_subjects;
    prefix_audit_record audit[PREFIX_AUDIT_SIZE];
    size_t audit_next;
    size_t audit_count;
    unsigned long now;
} prefix_t;

int prefix_ct_equal(const uint8_t *a, const uint8_t *b, size_t len)
{
    volatile uint8_t diff = 0;
    size_t i;
    for (i = 0; i < len; i++) {
        diff |= (uint8_t)(a[i] ^ b[i]);
    }
    return diff == 0;
}

void prefix_init(prefix_t *m)
{
    memset(m, 0, sizeof *m);
}

void prefix_tick(prefix_t *m, unsigned long ticks)
{
    m->now += ticks;
}

static prefix_subject *prefix_subject_for(prefix_t *m, uint32_t uid)
{
    size_t i;
    for (i = 0; i < m->n_subjects; i++) {
        if (m->subjects[i].uid == uid) {
            return &m->subjects[i];
        }
    }
    if (m->n_subjects == PREFIX_MAX_SUBJECTS) {
        return NULL;
    }
    m->subjects[m->n_subjects].uid = uid;
    m->subjects[m->n_subjects].failures = 0;
    m->subjects[m->n_subjects].locked_until = 0;
    return &m->subjects[m->n_subjects++];
}

static int prefix_record(prefix_t *m, uint32_t uid, int result)
{
    prefix_audit_record *r = &m->audit[m->audit_next];
    r->uid = uid;
    r->result = result;
    r->tick = m->now;
    m->audit_next = (m->audit_next + 1u) % PREFIX_AUDIT_SIZE;
    if (m->audit_count < PREFIX_AUDIT_SIZE) {
        m->audit_count++;
    }
    return result;
}

/* 0: authenticated; -1: wrong secret; -2: locked out; -3: subject table full. */
int prefix_authenticate(prefix_t *m, uint32_t uid, const uint8_t *secret, const uint8_t *expected, size_t len)
{
    prefix_subject *s = prefix_subject_for(m, uid);
    if (s == NULL) {
        return prefix_record(m, uid, -3);
    }
    if (m->now < s->locked_until) {
        return prefix_record(m, uid, -2);
    }
    if (!prefix_ct_equal(secret, expected, len)) {
        if (++s->failures >= PREFIX_MAX_FAILURES) {
            s->failures = 0;
            s->locked_until = m->now + PREFIX_LOCKOUT_TICKS;
        }
        return prefix_record(m, uid, -1);
    }
    s->failures = 0;
    return prefix_record(m, uid, 0);
}

int prefix_selftest(void)
{
    static prefix_t m;
    static const uint8_t secret[8] = {SECRET};
    uint8_t wrong[8];
    unsigned i;

    memcpy(wrong, secret, sizeof wrong);
    wrong[3] ^= 0x5Au;
    prefix_init(&m);
    if (prefix_authenticate(&m, 42u, secret, secret, sizeof secret) != 0) {
        return 1;
    }
    for (i = 0; i < PREFIX_MAX_FAILURES; i++) {
        if (prefix_authenticate(&m, 42u, wrong, secret, sizeof secret) != -1) {
            return 2;
        }
    }
    if (prefix_authenticate(&m, 42u, secret, secret, sizeof secret) != -2) {
        return 3;
    }
    prefix_tick(&m, PREFIX_LOCKOUT_TICKS);
    if (prefix_authenticate(&m, 42u, secret, secret, sizeof secret) != 0) {
        return 4;
    }
    if (m.audit_count != (PREFIX_MAX_FAILURES + 3u < PREFIX_AUDIT_SIZE ? PREFIX_MAX_FAILURES + 3u : PREFIX_AUDIT_SIZE)) {
        return 5;
    }
    for (i = 0; i < PREFIX_MAX_SUBJECTS; i++) {
        (void)prefix_authenticate(&m, 1000u + i, secret, secret, sizeof secret);
    }
    return prefix_authenticate(&m, 999999u, secret, secret, sizeof secret) == -3 ? 0 : 6;
}
