-- Merchants' webhook endpoints and every delivery try. The signing secret is
-- kept as is (it is needed to sign); it is shown to the merchant once, at
-- creation, and never logged.
CREATE TABLE webhook_endpoints (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_id       text NOT NULL UNIQUE,
    account_id      bigint NOT NULL REFERENCES accounts (id),
    url             text NOT NULL CHECK (length(url) BETWEEN 8 AND 2048),
    enabled_events  text[] NOT NULL CHECK (cardinality(enabled_events) BETWEEN 1 AND 100),
    description     text,
    status          text NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled')),
    secret          text NOT NULL,
    failing_since   timestamptz,
    deleted         boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_account_id ON webhook_endpoints (account_id, id DESC)
    WHERE NOT deleted;

CREATE TABLE webhook_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints (id),
    outbox_id       bigint NOT NULL REFERENCES outbox (id),
    status          text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'delivered', 'failed', 'abandoned')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (endpoint_id, outbox_id)
);
-- Due deliveries, oldest first; and per endpoint in event order.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at, id)
    WHERE status IN ('pending', 'failed');
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, outbox_id)
    WHERE status IN ('pending', 'failed');

CREATE FUNCTION webhook_endpoint_object(w webhook_endpoints, with_secret boolean) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'id', w.public_id,
        'object', 'webhook_endpoint',
        'api_version', '2024-06-20',
        'created', extract(epoch FROM w.created_at)::bigint,
        'description', w.description,
        'enabled_events', to_json(w.enabled_events),
        'livemode', false,
        'metadata', '{}'::json,
        'secret', CASE WHEN with_secret THEN w.secret END,
        'status', w.status,
        'url', w.url)
$$;
