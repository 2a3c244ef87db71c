/*
 * auth - API key authentication for /v1 requests.
 *
 * Offers auth_cache_new()/auth_cache_free() and auth_lookup(). A key is
 * never stored: its SHA-256 is looked up in api_keys. Successful lookups
 * are kept in a small direct-mapped cache for AUTH_CACHE_TTL_MS, so a busy
 * account costs no database round trip per request; a revoked key is
 * refused within that time. Failed lookups are not cached.
 * auth_lookup_account() maps the account named by a verified JWT the same
 * way. The callback
 * gets the internal account id, or 0 when the key is unknown, and -1 when
 * the database could not answer. Calls pgev, crypto.
 */
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "crypto.h"
#include "shm.h"
#include "xmalloc.h"

#define AUTH_CACHE_SLOTS  1024
#define AUTH_CACHE_TTL_MS 60000

struct auth_slot {
    uint8_t hash[32];
    int64_t account_id;
    int64_t expires_mono;
};

struct auth_cache {
    struct auth_slot slots[AUTH_CACHE_SLOTS];
};

struct auth_cache *
auth_cache_new(void)
{
    return xcalloc(1, sizeof(struct auth_cache));
}

void
auth_cache_free(struct auth_cache *c)
{
    free(c);
}

static struct auth_slot *
auth_slot(struct auth_cache *c, const uint8_t hash[32])
{
    unsigned idx = ((unsigned)hash[0] << 8 | hash[1]) % AUTH_CACHE_SLOTS;
    return &c->slots[idx];
}

struct auth_pending {
    struct api_req *r;
    auth_cb cb;
    uint8_t hash[32];
};

static void
auth_on_row(void *arg, PGresult *res, const char *err)
{
    struct auth_pending *p = arg;
    struct api_req *r = p->r;
    int64_t account = -1;
    (void)err;
    if (res && PQresultStatus(res) == PGRES_TUPLES_OK) {
        account = 0;
        if (PQntuples(res) == 1) {
            account = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
            struct auth_slot *s = auth_slot(r->api->auth, p->hash);
            memcpy(s->hash, p->hash, 32);
            s->account_id = account;
            s->expires_mono = shm_mono_ms() + AUTH_CACHE_TTL_MS;
        }
    }
    auth_cb cb = p->cb;
    free(p);
    cb(r, account);
}

/* Answers from the cache, or starts the lookup for hash with sql. */
static void
auth_cached_lookup(struct api_req *r, const uint8_t hash[32], const char *sql, const char *param,
                   auth_cb cb)
{
    struct auth_slot *s = auth_slot(r->api->auth, hash);
    if (s->account_id > 0 && s->expires_mono > shm_mono_ms() &&
        crypto_equal(s->hash, hash, 32) == 0) {
        cb(r, s->account_id);
        return;
    }
    struct auth_pending *p = xmalloc(sizeof(*p));
    p->r = r;
    p->cb = cb;
    memcpy(p->hash, hash, 32);
    const char *params[1] = {param};
    pgev_exec(r->api->pg, sql, 1, params, auth_on_row, p);
}

void
auth_lookup(struct api_req *r, const char *key, auth_cb cb)
{
    uint8_t hash[32];
    char hex[65];
    crypto_sha256(key, strlen(key), hash);
    crypto_hex(hash, 32, hex);
    auth_cached_lookup(r, hash,
                       "SELECT account_id FROM api_keys WHERE key_hash = decode($1, 'hex')"
                       " AND revoked_at IS NULL",
                       hex, cb);
}

void
auth_lookup_account(struct api_req *r, const char *public_id, auth_cb cb)
{
    uint8_t hash[32];
    char *tagged = xasprintf("account:%s", public_id); /* never equal to a key's hash */
    crypto_sha256(tagged, strlen(tagged), hash);
    free(tagged);
    auth_cached_lookup(r, hash, "SELECT id FROM accounts WHERE public_id = $1", public_id, cb);
}
