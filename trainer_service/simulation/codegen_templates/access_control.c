/* Template for the security module: constant-time compare and an access-control list.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef ENTRIES
#define ENTRIES 8u
#endif
#ifndef TOKEN_LEN
#define TOKEN_LEN 16
#endif
#ifndef TOKEN
#define TOKEN 0x5a
#endif
#ifndef UID
#define UID 1000u
#endif
/* ---- template body ---- */
/* Token comparison that takes the same time wherever the first difference is,
 * plus a default-deny access-control list where an explicit deny wins. */
#define PREFIX_MAX_ENTRIES ENTRIES
#define PREFIX_PERM_READ 0x1u
#define PREFIX_PERM_WRITE 0x2u
#define PREFIX_PERM_EXEC 0x4u
#define PREFIX_ANY_UID 0xFFFFFFFFu

typedef struct {
    uint32_t uid;
    uint32_t allow;
    uint32_t deny;
} prefix_ace;

typedef struct {
    prefix_ace entries[PREFIX_MAX_ENTRIES];
    size_t count;
} prefix_acl;

int prefix_ct_equal(const uint8_t *a, const uint8_t *b, size_t len)
{
    volatile uint8_t diff = 0;
    size_t i;
    for (i = 0; i < len; i++) {
        diff |= (uint8_t)(a[i] ^ b[i]);
    }
    return diff == 0;
}

void prefix_acl_init(prefix_acl *acl)
{
    acl->count = 0;
}

static prefix_ace *prefix_acl_entry(prefix_acl *acl, uint32_t uid, int create)
{
    size_t i;
    for (i = 0; i < acl->count; i++) {
        if (acl->entries[i].uid == uid) {
            return &acl->entries[i];
        }
    }
    if (!create || acl->count == PREFIX_MAX_ENTRIES) {
        return NULL;
    }
    acl->entries[acl->count].uid = uid;
    acl->entries[acl->count].allow = 0;
    acl->entries[acl->count].deny = 0;
    return &acl->entries[acl->count++];
}

int prefix_acl_grant(prefix_acl *acl, uint32_t uid, uint32_t perms)
{
    prefix_ace *e = prefix_acl_entry(acl, uid, 1);
    if (e == NULL) {
        return -1;
    }
    e->allow |= perms;
    return 0;
}

int prefix_acl_deny(prefix_acl *acl, uint32_t uid, uint32_t perms)
{
    prefix_ace *e = prefix_acl_entry(acl, uid, 1);
    if (e == NULL) {
        return -1;
    }
    e->deny |= perms;
    return 0;
}

int prefix_acl_check(const prefix_acl *acl, uint32_t uid, uint32_t want)
{
    uint32_t allow = 0;
    uint32_t deny = 0;
    size_t i;
    if (want == 0u) {
        return 0;
    }
    for (i = 0; i < acl->count; i++) {
        if (acl->entries[i].uid == uid || acl->entries[i].uid == PREFIX_ANY_UID) {
            allow |= acl->entries[i].allow;
            deny |= acl->entries[i].deny;
        }
    }
    return (want & deny) == 0u && (want & allow) == want;
}

int prefix_selftest(void)
{
    static prefix_acl acl;
    const uint8_t token[TOKEN_LEN] = {TOKEN};
    uint8_t probe[TOKEN_LEN];
    uint32_t uid;

    memcpy(probe, token, sizeof probe);
    if (!prefix_ct_equal(token, probe, sizeof probe)) {
        return 1;
    }
    probe[sizeof probe - 1] ^= 0x1u;
    if (prefix_ct_equal(token, probe, sizeof probe)) {
        return 2;
    }
    prefix_acl_init(&acl);
    if (prefix_acl_grant(&acl, UID, PREFIX_PERM_READ | PREFIX_PERM_WRITE) != 0) {
        return 3;
    }
    if (!prefix_acl_check(&acl, UID, PREFIX_PERM_READ) || prefix_acl_check(&acl, UID, PREFIX_PERM_EXEC) ||
        prefix_acl_check(&acl, UID + 1u, PREFIX_PERM_READ)) {
        return 4;
    }
    if (prefix_acl_deny(&acl, UID, PREFIX_PERM_WRITE) != 0 ||
        prefix_acl_check(&acl, UID, PREFIX_PERM_READ | PREFIX_PERM_WRITE)) {
        return 5;
    }
    if (prefix_acl_grant(&acl, PREFIX_ANY_UID, PREFIX_PERM_EXEC) != 0 || !prefix_acl_check(&acl, 7u, PREFIX_PERM_EXEC)) {
        return 6;
    }
    for (uid = 1; uid <= PREFIX_MAX_ENTRIES; uid++) {
        (void)prefix_acl_grant(&acl, UID + 100u + uid, PREFIX_PERM_READ);
    }
    if (acl.count != PREFIX_MAX_ENTRIES || prefix_acl_grant(&acl, 1u, PREFIX_PERM_READ) != -1) {
        return 7;
    }
    return 0;
}
