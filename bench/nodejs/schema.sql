-- Tables of the plain Node.js baseline (bench/nodejs/server.js). Prefixed
-- nodebench_ so they can live in the paymentd database beside paymentd's own
-- tables without touching them. Idempotent: safe to apply on every start.
-- Money is bigint minor units.

-- Only the SHA-256 (hex) of a key is stored.
CREATE TABLE IF NOT EXISTS nodebench_api_keys (
    key_hash    text PRIMARY KEY CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    account_id  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX IF NOT EXISTS nodebench_api_keys_account ON nodebench_api_keys (account_id);

CREATE TABLE IF NOT EXISTS nodebench_intents (
    id               text PRIMARY KEY,
    account_id       text NOT NULL,
    amount           bigint NOT NULL CHECK (amount > 0),
    currency         text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    payment_method   text NOT NULL,
    status           text NOT NULL CHECK (status IN ('requires_payment_method',
                         'requires_confirmation', 'requires_action', 'processing',
                         'requires_capture', 'succeeded', 'canceled')),
    amount_received  bigint NOT NULL DEFAULT 0 CHECK (amount_received >= 0),
    latest_charge    text,
    last_payment_error jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (amount_received <= amount)
);
-- Lists: newest first per account.
CREATE INDEX IF NOT EXISTS nodebench_intents_account_created
    ON nodebench_intents (account_id, created_at DESC);

-- One row per (account, Idempotency-Key): what the request was (its hash),
-- which intent it created, and, once finished, the answer it got.
CREATE TABLE IF NOT EXISTS nodebench_idempotency (
    account_id     text NOT NULL,
    idem_key       text NOT NULL CHECK (length(idem_key) BETWEEN 1 AND 255),
    request_hash   text NOT NULL,
    intent_id      text NOT NULL,
    response_code  integer,
    response_body  text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    completed_at   timestamptz,
    PRIMARY KEY (account_id, idem_key)
);
-- Expiry sweeps (keys are kept 24 hours).
CREATE INDEX IF NOT EXISTS nodebench_idempotency_created ON nodebench_idempotency (created_at);

-- Events to publish, written in the same transaction as the change they
-- describe; a relay reads the unsent ones in id order and sets sent_at.
CREATE TABLE IF NOT EXISTS nodebench_outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_type    text NOT NULL,
    aggregate_id  text NOT NULL,
    payload       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz
);
CREATE INDEX IF NOT EXISTS nodebench_outbox_unsent ON nodebench_outbox (id) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS nodebench_outbox_aggregate ON nodebench_outbox (aggregate_id);

-- Money movements: one charge row per succeeded gateway charge.
CREATE TABLE IF NOT EXISTS nodebench_transactions (
    id                 text PRIMARY KEY,
    intent_id          text NOT NULL REFERENCES nodebench_intents (id),
    account_id         text NOT NULL,
    type               text NOT NULL CHECK (type IN ('charge', 'refund')),
    amount             bigint NOT NULL CHECK (amount > 0),
    currency           text NOT NULL,
    gateway_charge_id  text NOT NULL UNIQUE,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS nodebench_transactions_intent ON nodebench_transactions (intent_id);
