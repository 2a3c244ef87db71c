-- The helpers every payment calls, as PL/pgSQL. A LANGUAGE sql function
-- that PostgreSQL 15 cannot inline (one that writes, reads a table, or
-- returns a set) is parsed and planned again in every transaction that
-- calls it: profiled under pgbench of one payment's two statements, the
-- parser alone took ~5 % of the database's CPU. PL/pgSQL keeps each
-- statement's plan for the life of the connection. Same signatures, same
-- results; CREATE OR REPLACE keeps every caller as it is.

CREATE OR REPLACE FUNCTION outbox_event(
    p_account bigint, p_type text, p_object json, p_aggregate text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_id text := 'evt_' || replace(gen_random_uuid()::text, '-', '');
BEGIN
    INSERT INTO outbox (event_id, account_id, aggregate_type, aggregate_id, type, payload)
    VALUES (v_id, p_account, 'payment_intent', p_aggregate, p_type,
            json_build_object('id', v_id, 'object', 'event', 'api_version', '2024-06-20',
                              'created', extract(epoch FROM now())::bigint,
                              'livemode', false, 'type', p_type,
                              'data', json_build_object('object', p_object)));
END
$$;

CREATE OR REPLACE FUNCTION saga_outcome_event(p payment_intents, p_transaction text, p_reason text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_at text := to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"');
BEGIN
    INSERT INTO outbox (event_id, account_id, aggregate_type, aggregate_id, type, payload)
    VALUES ('evt_' || replace(gen_random_uuid()::text, '-', ''), p.account_id, 'order',
            p.public_id,
            CASE WHEN p.status = 'succeeded' THEN 'PaymentCompleted' ELSE 'PaymentFailed' END,
            CASE WHEN p.status = 'succeeded' THEN
                jsonb_build_object('orderId', p.order_id, 'paymentId', p.public_id,
                                   'transactionId', p_transaction, 'amount', p.amount_received,
                                   'currency', p.currency, 'timestamp', v_at)
            ELSE
                jsonb_build_object('orderId', p.order_id, 'paymentId', p.public_id,
                                   'reason', coalesce(p_reason, p.status), 'timestamp', v_at)
            END);
END
$$;

CREATE OR REPLACE FUNCTION attempt_allowed(p_type text, p_from text, p_to text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN p_from = p_to OR EXISTS (SELECT 1 FROM attempt_transitions
        WHERE type = p_type AND from_status = p_from AND to_status = p_to);
END
$$;

CREATE OR REPLACE FUNCTION attempt_job(p_id bigint) RETURNS SETOF attempt_jobs
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN QUERY SELECT * FROM attempt_jobs WHERE attempt_id = p_id;
END
$$;

CREATE OR REPLACE FUNCTION attempt_open(p payment_intents, p_type text, p_amount bigint,
    p_parent bigint, p_purpose text, p_reason text, p_provider text, p_lease_ms bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO payment_transactions (transaction_id, payment_intent_id, type, status, amount,
        currency, gateway_provider, idempotency_key, parent_id, purpose, reason, payment_method,
        lease_until)
    VALUES ('txn_' || replace(gen_random_uuid()::text, '-', ''), p.id, p_type, 'pending', p_amount,
        p.currency, p_provider,
        p.public_id || ':' || CASE WHEN p_type IN ('charge', 'authorization') THEN 'confirm'
                                   ELSE p_type END || ':' || p.version,
        p_parent, p_purpose, p_reason,
        CASE WHEN p_type IN ('charge', 'authorization') THEN p.payment_method END,
        now() + p_lease_ms * interval '1 millisecond')
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

CREATE OR REPLACE FUNCTION attempt_open_charge(p_payment bigint) RETURNS payment_transactions
LANGUAGE plpgsql STABLE AS $$
DECLARE
    a payment_transactions;
BEGIN
    SELECT * INTO a FROM payment_transactions WHERE payment_intent_id = p_payment
      AND type IN ('charge', 'authorization') AND status IN ('requires_action', 'requires_capture')
    ORDER BY id DESC LIMIT 1;
    RETURN a;
END
$$;

CREATE OR REPLACE FUNCTION idempotency_progress(p_row bigint, p_point text, p_resource bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE idempotency_keys SET recovery_point = p_point, resource_id = p_resource
        WHERE id = p_row;
END
$$;

CREATE OR REPLACE FUNCTION payment_next(p_from text, p_event text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT to_status FROM payment_transitions
            WHERE from_status = p_from AND event = p_event);
END
$$;

CREATE OR REPLACE FUNCTION payment_paid_by(p_payment bigint) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT transaction_id FROM payment_transactions WHERE payment_intent_id = p_payment
            AND type IN ('charge', 'capture') AND status = 'succeeded' ORDER BY id DESC LIMIT 1);
END
$$;
