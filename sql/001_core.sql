-- Accounts, API keys, payment intents, transactions, idempotency keys and the
-- outbox: the tables of the payments core. Money is bigint minor units.

CREATE TABLE accounts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_id   text NOT NULL UNIQUE CHECK (public_id ~ '^acct_[0-9a-z]{16,40}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Only the SHA-256 of a key is stored; the prefix is for display.
CREATE TABLE api_keys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id),
    key_hash    bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    key_prefix  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE payment_intents (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_id               text NOT NULL UNIQUE,
    account_id              bigint NOT NULL REFERENCES accounts (id),
    order_id                text,
    customer                text,
    description             text,
    amount                  bigint NOT NULL CHECK (amount > 0 AND amount <= 99999999999),
    currency                text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    status                  text NOT NULL CHECK (status IN ('requires_payment_method',
                                'requires_confirmation', 'requires_action', 'processing',
                                'requires_capture', 'succeeded', 'canceled')),
    capture_method          text NOT NULL DEFAULT 'automatic'
                                CHECK (capture_method IN ('automatic', 'manual')),
    payment_method          text,
    gateway_provider        text,
    gateway_intent_id       text UNIQUE,
    latest_charge           text,
    amount_capturable       bigint NOT NULL DEFAULT 0 CHECK (amount_capturable >= 0),
    amount_received         bigint NOT NULL DEFAULT 0 CHECK (amount_received >= 0),
    amount_refunded         bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    application_fee_amount  bigint CHECK (application_fee_amount >= 0),
    last_payment_error      jsonb,
    next_action             jsonb,
    cancellation_reason     text,
    canceled_at             timestamptz,
    metadata                jsonb NOT NULL DEFAULT '{}',
    version                 integer NOT NULL DEFAULT 1,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    expires_at              timestamptz,
    CHECK (amount_received <= amount),
    CHECK (amount_refunded <= amount_received),
    CHECK (amount_capturable <= amount)
);
-- Lists: newest first per account, keyset on the identity key.
CREATE INDEX payment_intents_account_id ON payment_intents (account_id, id DESC);
CREATE INDEX payment_intents_account_customer ON payment_intents (account_id, customer, id DESC)
    WHERE customer IS NOT NULL;
CREATE INDEX payment_intents_account_created ON payment_intents (account_id, created_at);
-- One payment per order and account (the saga relies on it).
CREATE UNIQUE INDEX payment_intents_account_order ON payment_intents (account_id, order_id)
    WHERE order_id IS NOT NULL;
-- Recovery of payments left in processing, and expiry of open intents.
CREATE INDEX payment_intents_processing ON payment_intents (updated_at)
    WHERE status = 'processing';
CREATE INDEX payment_intents_expiring ON payment_intents (expires_at)
    WHERE status IN ('requires_payment_method', 'requires_confirmation', 'requires_action');

-- Every gateway attempt, capture, cancel and refund; appended, never edited
-- except status and reconciliation fields.
CREATE TABLE payment_transactions (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id          text NOT NULL UNIQUE,
    payment_intent_id       bigint NOT NULL REFERENCES payment_intents (id),
    type                    text NOT NULL CHECK (type IN ('authorization', 'charge', 'capture',
                                'cancel', 'refund')),
    status                  text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed',
                                'requires_action')),
    amount                  bigint NOT NULL CHECK (amount >= 0),
    currency                text NOT NULL,
    gateway_provider        text NOT NULL,
    gateway_transaction_id  text,
    failure_code            text,
    failure_message         text,
    reconciled              boolean NOT NULL DEFAULT false,
    created_at              timestamptz NOT NULL DEFAULT now(),
    processed_at            timestamptz
);
CREATE INDEX payment_transactions_intent ON payment_transactions (payment_intent_id, id);
CREATE INDEX payment_transactions_gateway ON payment_transactions (gateway_provider,
    gateway_transaction_id);
CREATE INDEX payment_transactions_unreconciled ON payment_transactions (processed_at)
    WHERE NOT reconciled;

CREATE TABLE idempotency_keys (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id       bigint NOT NULL REFERENCES accounts (id),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_method   text NOT NULL,
    request_path     text NOT NULL,
    request_hash     bytea NOT NULL,
    locked_at        timestamptz,
    recovery_point   text NOT NULL DEFAULT 'started',
    resource_id      bigint,
    response_code    integer,
    response_body    text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, idempotency_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- Written in the same transaction as the change it announces.
CREATE TABLE outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        text NOT NULL UNIQUE,
    account_id      bigint REFERENCES accounts (id),
    aggregate_type  text NOT NULL,
    aggregate_id    text NOT NULL,
    type            text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    available_at    timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    sent_at         timestamptz,
    last_error      text
);
CREATE INDEX outbox_pending ON outbox (available_at, id) WHERE sent_at IS NULL;
CREATE INDEX outbox_aggregate ON outbox (aggregate_id, id);

-- A PaymentIntent as the API shows it (Stripe's shape and key order).
CREATE FUNCTION payment_intent_object(p payment_intents) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'id', p.public_id,
        'object', 'payment_intent',
        'amount', p.amount,
        'amount_capturable', p.amount_capturable,
        'amount_received', p.amount_received,
        'application_fee_amount', p.application_fee_amount,
        'canceled_at', extract(epoch FROM p.canceled_at)::bigint,
        'cancellation_reason', p.cancellation_reason,
        'capture_method', p.capture_method,
        'client_secret', p.public_id || '_secret',
        'confirmation_method', 'automatic',
        'created', extract(epoch FROM p.created_at)::bigint,
        'currency', p.currency,
        'customer', p.customer,
        'description', p.description,
        'last_payment_error', p.last_payment_error,
        'latest_charge', p.latest_charge,
        'livemode', false,
        'metadata', p.metadata,
        'next_action', p.next_action,
        'payment_method', p.payment_method,
        'payment_method_types', json_build_array('card'),
        'status', p.status
    )
$$;

-- An event as the API and the sinks show it.
CREATE FUNCTION outbox_event(
    p_account bigint, p_type text, p_object json, p_aggregate text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO outbox (event_id, account_id, aggregate_type, aggregate_id, type, payload)
    SELECT e.id, p_account, 'payment_intent', p_aggregate, p_type,
           json_build_object('id', e.id, 'object', 'event', 'api_version', '2024-06-20',
                             'created', extract(epoch FROM now())::bigint,
                             'livemode', false, 'type', p_type,
                             'data', json_build_object('object', p_object))
    FROM (SELECT 'evt_' || replace(gen_random_uuid()::text, '-', '') AS id) e
$$;
