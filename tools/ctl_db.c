/*
 * ctl_db - paymentctl's database commands: migrate, create-account and
 * create-key. A command-line tool may block, so this uses libpq's plain
 * synchronous calls.
 *
 * Offers ctl_migrate(): applies the compiled-in sql/ migrations that
 * schema_migrations does not list, in order, each in its own transaction,
 * under a session advisory lock so that two hosts migrating at once apply
 * each migration exactly once; then, in one transaction, it makes the
 * payment_transitions and attempt_transitions tables equal to
 * common/paystate.c's, so the database enforces the state machine the
 * programs were built with. ctl_create_account() and ctl_create_key()
 * print new identifiers; a key is printed once and only its SHA-256 is
 * stored. Errors are printed with the database's message and exit code 1.
 * Calls libpq, migrations, crypto, ids, pgev (connection keywords).
 */
#include "ctl_db.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crypto.h"
#include "ids.h"
#include "migrations.h"
#include "paystate.h"
#include "pgev.h"

#define MIGRATE_LOCK_ID "7215403901"

static PGconn *
ctl_connect(const struct config *cfg)
{
    const char *keys[16], *vals[16];
    pgev_conninfo(cfg, keys, vals, 15);
    PGconn *pg = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(pg) != CONNECTION_OK) {
        fprintf(stderr, "paymentctl: cannot connect to PostgreSQL: %s", PQerrorMessage(pg));
        PQfinish(pg);
        return NULL;
    }
    PGresult *r = PQexec(pg, "SET client_min_messages = warning");
    PQclear(r);
    return pg;
}

static int
ctl_exec(PGconn *pg, const char *sql)
{
    PGresult *r = PQexec(pg, sql);
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
    if (!ok)
        fprintf(stderr, "paymentctl: %s", PQerrorMessage(pg));
    PQclear(r);
    return ok ? 0 : -1;
}

static int
ctl_applied(PGconn *pg, int version)
{
    char v[16];
    const char *params[1] = {v};
    snprintf(v, sizeof(v), "%d", version);
    PGresult *r = PQexecParams(pg, "SELECT 1 FROM schema_migrations WHERE version = $1", 1, NULL,
                               params, NULL, NULL, 0);
    int applied = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;
    PQclear(r);
    return applied;
}

static int
ctl_insert(PGconn *pg, const char *sql, int n, const char *const *params)
{
    PGresult *r = PQexecParams(pg, sql, n, NULL, params, NULL, NULL, 0);
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (!ok)
        fprintf(stderr, "paymentctl: %s", PQerrorMessage(pg));
    PQclear(r);
    return ok ? 0 : -1;
}

/* The state machine's tables, replaced whole in one transaction. */
static int
ctl_sync_transitions(PGconn *pg)
{
    if (ctl_exec(pg, "BEGIN") < 0)
        return -1;
    if (ctl_exec(pg, "DELETE FROM payment_transitions") < 0 ||
        ctl_exec(pg, "DELETE FROM attempt_transitions") < 0 ||
        ctl_exec(pg, "DELETE FROM refund_transitions") < 0)
        goto fail;
    for (size_t i = 0; i < paystate_refund_transitions_count; i++) {
        const struct paystate_refund_transition *t = &paystate_refund_transitions[i];
        const char *params[4] = {t->from, t->event, t->to, t->outbox_event};
        if (ctl_insert(pg,
                       "INSERT INTO refund_transitions (from_status, event, to_status,"
                       " outbox_event) VALUES ($1, $2, $3, $4)",
                       4, params) < 0)
            goto fail;
    }
    for (size_t i = 0; i < paystate_transitions_count; i++) {
        const struct paystate_transition *t = &paystate_transitions[i];
        const char *params[4] = {t->from, t->event, t->to, t->outbox_event};
        if (ctl_insert(pg,
                       "INSERT INTO payment_transitions (from_status, event, to_status,"
                       " outbox_event) VALUES ($1, $2, $3, $4)",
                       4, params) < 0)
            goto fail;
    }
    for (size_t i = 0; i < paystate_attempt_transitions_count; i++) {
        const struct paystate_attempt_transition *t = &paystate_attempt_transitions[i];
        const char *params[3] = {t->type, t->from, t->to};
        if (ctl_insert(pg,
                       "INSERT INTO attempt_transitions (type, from_status, to_status)"
                       " VALUES ($1, $2, $3)",
                       3, params) < 0)
            goto fail;
    }
    if (ctl_exec(pg, "COMMIT") < 0)
        goto fail;
    return 0;
fail:
    ctl_exec(pg, "ROLLBACK");
    fprintf(stderr, "paymentctl: the state machine's tables were not written\n");
    return -1;
}

int
ctl_migrate(const struct config *cfg)
{
    PGconn *pg = ctl_connect(cfg);
    int rc = 1, applied = 0;
    if (!pg)
        return 1;
    if (ctl_exec(pg, "SELECT pg_advisory_lock(" MIGRATE_LOCK_ID ")") < 0)
        goto out;
    if (ctl_exec(pg, "CREATE TABLE IF NOT EXISTS schema_migrations ("
                     " version integer PRIMARY KEY, name text NOT NULL,"
                     " applied_at timestamptz NOT NULL DEFAULT now())") < 0)
        goto out;
    for (int i = 0; i < migrations_count; i++) {
        const struct migration *m = &migrations[i];
        if (ctl_applied(pg, m->version))
            continue;
        char v[16];
        const char *params[2] = {v, m->name};
        snprintf(v, sizeof(v), "%d", m->version);
        if (ctl_exec(pg, "BEGIN") < 0)
            goto out;
        if (ctl_exec(pg, m->sql) < 0) {
            fprintf(stderr, "paymentctl: migration %s failed; nothing of it was applied\n",
                    m->name);
            ctl_exec(pg, "ROLLBACK");
            goto out;
        }
        PGresult *r = PQexecParams(pg,
                                   "INSERT INTO schema_migrations (version, name) VALUES "
                                   "($1, $2)",
                                   2, NULL, params, NULL, NULL, 0);
        int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        PQclear(r);
        if (!ok || ctl_exec(pg, "COMMIT") < 0) {
            ctl_exec(pg, "ROLLBACK");
            goto out;
        }
        printf("applied %s\n", m->name);
        applied++;
    }
    if (applied == 0)
        printf("database is up to date (%d migrations)\n", migrations_count);
    if (ctl_sync_transitions(pg) < 0)
        goto out;
    rc = 0;
out:
    PQfinish(pg);
    return rc;
}

int
ctl_create_account(const struct config *cfg, const char *name)
{
    char id[64];
    const char *params[2] = {id, name};
    PGconn *pg = ctl_connect(cfg);
    if (!pg)
        return 1;
    ids_random(id, sizeof(id), "acct_", 10);
    PGresult *r = PQexecParams(pg, "INSERT INTO accounts (public_id, name) VALUES ($1, $2)", 2,
                               NULL, params, NULL, NULL, 0);
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (ok)
        printf("%s\n", id);
    else
        fprintf(stderr, "paymentctl: %s", PQerrorMessage(pg));
    PQclear(r);
    PQfinish(pg);
    return ok ? 0 : 1;
}

int
ctl_create_key(const struct config *cfg, const char *account)
{
    char key[128], hex[65], prefix[20];
    uint8_t hash[32];
    PGconn *pg = ctl_connect(cfg);
    if (!pg)
        return 1;
    ids_random(key, sizeof(key), "sk_test_", 24);
    crypto_sha256(key, strlen(key), hash);
    crypto_hex(hash, 32, hex);
    snprintf(prefix, sizeof(prefix), "%.12s", key);
    const char *params[3] = {account, hex, prefix};
    PGresult *r = PQexecParams(pg,
                               "INSERT INTO api_keys (account_id, key_hash, key_prefix)"
                               " SELECT id, decode($2, 'hex'), $3 FROM accounts"
                               " WHERE public_id = $1",
                               3, NULL, params, NULL, NULL, 0);
    int rc = 1;
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        fprintf(stderr, "paymentctl: %s", PQerrorMessage(pg));
    else if (strcmp(PQcmdTuples(r), "1") != 0)
        fprintf(stderr, "paymentctl: no account %s\n", account);
    else {
        printf("%s\n", key);
        rc = 0;
    }
    PQclear(r);
    PQfinish(pg);
    return rc;
}

int
ctl_revoke_key(const struct config *cfg, const char *key)
{
    char hex[65];
    uint8_t hash[32];
    PGconn *pg = ctl_connect(cfg);
    if (!pg)
        return 1;
    crypto_sha256(key, strlen(key), hash);
    crypto_hex(hash, 32, hex);
    const char *params[1] = {hex};
    PGresult *r = PQexecParams(pg,
                               "UPDATE api_keys SET revoked_at = now()"
                               " WHERE key_hash = decode($1, 'hex') AND revoked_at IS NULL",
                               1, NULL, params, NULL, NULL, 0);
    int rc = 1;
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        fprintf(stderr, "paymentctl: %s", PQerrorMessage(pg));
    else if (strcmp(PQcmdTuples(r), "1") != 0)
        fprintf(stderr, "paymentctl: no such active key\n"); /* never echo the key */
    else {
        printf("revoked; api processes refuse it within 60 s (their key cache)\n");
        rc = 0;
    }
    PQclear(r);
    PQfinish(pg);
    return rc;
}
