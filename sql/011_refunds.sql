-- Refunds: Stripe's refund object, each one a gateway attempt of its own.
--
-- A refund holds its amount against the payment from the moment it is
-- created: amount_refund_pending grows under the payment's row lock, and a
-- CHECK keeps amount_refunded + amount_refund_pending <= amount_received,
-- so no sequence or concurrency of refunds can move more than was
-- captured. A failed or canceled refund gives its amount back; a succeeded
-- one moves it to amount_refunded. Refunds have their own transition table
-- (refund_transitions, filled from common/paystate.c by paymentctl migrate)
-- and a trigger that checks every status change against it and writes
-- refund.created / refund.updated / refund.failed, then charge.refunded
-- and, for an order's payment, the saga's PaymentRefunded. Refunds do not
-- take the payment's one-operation-in-flight slot: several may be pending.

CREATE TABLE refund_transitions (
    from_status   text NOT NULL,
    event         text NOT NULL,
    to_status     text NOT NULL,
    outbox_event  text,
    PRIMARY KEY (from_status, event)
);

ALTER TABLE payment_intents ADD COLUMN amount_refund_pending bigint NOT NULL DEFAULT 0
    CHECK (amount_refund_pending >= 0);
ALTER TABLE payment_intents ADD CONSTRAINT payment_intents_refunds_within_received
    CHECK (amount_refunded + amount_refund_pending <= amount_received);

ALTER TABLE payment_transactions DROP CONSTRAINT payment_transactions_type_check;
ALTER TABLE payment_transactions ADD CONSTRAINT payment_transactions_type_check
    CHECK (type IN ('charge', 'authorization', 'capture', 'void', 'refund', 'refund_cancel'));
DROP INDEX payment_transactions_in_flight;
CREATE UNIQUE INDEX payment_transactions_in_flight ON payment_transactions (payment_intent_id)
    WHERE status = 'pending' AND type NOT IN ('refund', 'refund_cancel');
CREATE INDEX payment_transactions_charge ON payment_transactions (gateway_transaction_id)
    WHERE gateway_transaction_id IS NOT NULL;

CREATE TABLE refunds (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_id          text NOT NULL UNIQUE,
    account_id         bigint NOT NULL REFERENCES accounts (id),
    payment_intent_id  bigint NOT NULL REFERENCES payment_intents (id),
    charge_attempt_id  bigint NOT NULL REFERENCES payment_transactions (id),
    attempt_id         bigint NOT NULL UNIQUE REFERENCES payment_transactions (id),
    amount             bigint NOT NULL CHECK (amount > 0),
    currency           text NOT NULL,
    status             text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed',
                                                        'canceled')),
    reason             text CHECK (reason IN ('duplicate', 'fraudulent', 'requested_by_customer')),
    failure_reason     text,
    metadata           jsonb NOT NULL DEFAULT '{}',
    transition         text,
    last_transition    text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
-- Lists: newest first per account, by payment, by charge.
CREATE INDEX refunds_account_id ON refunds (account_id, id DESC);
CREATE INDEX refunds_payment ON refunds (payment_intent_id, id);
CREATE INDEX refunds_charge ON refunds (charge_attempt_id, id);

-- A refund as the API shows it (Stripe's shape).
CREATE FUNCTION refund_object(r refunds) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'id', r.public_id,
        'object', 'refund',
        'amount', r.amount,
        'balance_transaction', NULL,
        'charge', (SELECT gateway_transaction_id FROM payment_transactions
                   WHERE id = r.charge_attempt_id),
        'created', extract(epoch FROM r.created_at)::bigint,
        'currency', r.currency,
        'failure_reason', r.failure_reason,
        'metadata', r.metadata,
        'payment_intent', (SELECT public_id FROM payment_intents WHERE id = r.payment_intent_id),
        'reason', r.reason,
        'receipt_number', NULL,
        'status', r.status)
$$;

-- A charge (a charge or authorization attempt the gateway answered) as the
-- API shows it, with its refunds.
CREATE FUNCTION charge_object(a payment_transactions) RETURNS json
LANGUAGE sql STABLE AS $$
    WITH rf AS (SELECT coalesce(sum(amount) FILTER (WHERE status = 'succeeded'), 0) AS refunded,
                       coalesce(json_agg(refund_object(x) ORDER BY x.id DESC), '[]') AS list
                FROM refunds x WHERE x.charge_attempt_id = a.id)
    SELECT json_build_object(
        'id', a.gateway_transaction_id,
        'object', 'charge',
        'amount', a.amount,
        'amount_captured', a.amount_captured,
        'amount_refunded', rf.refunded,
        'captured', a.amount_captured > 0,
        'created', extract(epoch FROM a.created_at)::bigint,
        'currency', a.currency,
        'failure_code', a.failure_code,
        'failure_message', a.failure_message,
        'livemode', false,
        'metadata', '{}'::json,
        'paid', a.status IN ('succeeded', 'requires_capture'),
        'payment_intent', p.public_id,
        'payment_method', a.payment_method,
        'refunded', a.amount_captured > 0 AND rf.refunded >= a.amount_captured,
        'refunds', json_build_object('object', 'list', 'data', rf.list, 'has_more', false,
                                     'url', '/v1/refunds?charge=' || a.gateway_transaction_id),
        'status', CASE a.status WHEN 'failed' THEN 'failed'
                                WHEN 'pending' THEN 'pending'
                                WHEN 'requires_action' THEN 'pending'
                                ELSE 'succeeded' END)
    FROM payment_intents p, rf WHERE p.id = a.payment_intent_id
$$;

-- The charges the API lists: attempts the gateway made a charge of.
CREATE VIEW charges AS
    SELECT a.id, a.gateway_transaction_id AS public_id, p.account_id, a.created_at,
           p.public_id AS payment_intent, a.payment_intent_id, a AS attempt
    FROM payment_transactions a JOIN payment_intents p ON p.id = a.payment_intent_id
    WHERE a.type IN ('charge', 'authorization') AND a.gateway_transaction_id IS NOT NULL;

-- The refunds the API lists, with what they are filtered by.
CREATE VIEW refunds_listed AS
    SELECT r.id, r.public_id, r.account_id, r.created_at, p.public_id AS payment_intent,
           c.gateway_transaction_id AS charge, r AS refund
    FROM refunds r JOIN payment_intents p ON p.id = r.payment_intent_id
    JOIN payment_transactions c ON c.id = r.charge_attempt_id;

-- ---- the refunds' state machine, enforced ----

CREATE FUNCTION refunds_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    t refund_transitions;
    v_from text := CASE WHEN TG_OP = 'INSERT' THEN '' ELSE OLD.status END;
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.amount <> OLD.amount OR NEW.attempt_id <> OLD.attempt_id
       OR NEW.payment_intent_id <> OLD.payment_intent_id) THEN
        RAISE EXCEPTION 'refund %: amount, attempt and payment never change', OLD.public_id
            USING ERRCODE = 'PD003';
    END IF;
    IF NEW.transition IS NULL THEN
        IF TG_OP = 'UPDATE' AND NEW.status = OLD.status THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'refund %: status % -> % without a transition', NEW.public_id, v_from,
            NEW.status USING ERRCODE = 'PD002';
    END IF;
    SELECT * INTO t FROM refund_transitions WHERE from_status = v_from AND event = NEW.transition;
    IF NOT FOUND OR t.to_status <> NEW.status THEN
        RAISE EXCEPTION 'refund %: illegal transition % --%--> %', NEW.public_id, v_from,
            NEW.transition, NEW.status USING ERRCODE = 'PD002';
    END IF;
    NEW.last_transition := NEW.transition;
    NEW.transition := NULL;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER refunds_transition BEFORE INSERT OR UPDATE ON refunds
    FOR EACH ROW EXECUTE FUNCTION refunds_transition();

-- The events, once the row is written (so the charge's object counts it).
CREATE FUNCTION refunds_announce() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    t refund_transitions;
    p payment_intents;
    c payment_transactions;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status = OLD.status THEN
        RETURN NULL;
    END IF;
    SELECT * INTO t FROM refund_transitions
        WHERE from_status = CASE WHEN TG_OP = 'INSERT' THEN '' ELSE OLD.status END
          AND event = NEW.last_transition;
    SELECT * INTO p FROM payment_intents WHERE id = NEW.payment_intent_id;
    IF t.outbox_event IS NOT NULL THEN
        PERFORM outbox_event(NEW.account_id, t.outbox_event, refund_object(NEW), p.public_id);
    END IF;
    IF NEW.status = 'succeeded' THEN
        SELECT * INTO c FROM payment_transactions WHERE id = NEW.charge_attempt_id;
        PERFORM outbox_event(NEW.account_id, 'charge.refunded', charge_object(c), p.public_id);
        IF p.order_id IS NOT NULL THEN
            INSERT INTO outbox (event_id, account_id, aggregate_type, aggregate_id, type, payload)
            VALUES ('evt_' || replace(gen_random_uuid()::text, '-', ''), p.account_id, 'order',
                    p.public_id, 'PaymentRefunded',
                    jsonb_build_object('orderId', p.order_id, 'paymentId', p.public_id,
                                       'refundId', NEW.public_id, 'amount', NEW.amount,
                                       'currency', NEW.currency,
                                       'timestamp', to_char(now() AT TIME ZONE 'UTC',
                                                            'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')));
        END IF;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER refunds_announce AFTER INSERT OR UPDATE ON refunds
    FOR EACH ROW EXECUTE FUNCTION refunds_announce();

-- ---- the api's operations ----

-- result: created, not_found, not_refundable (the payment has no captured
-- charge, or the charge named is not it), already_refunded, too_large
-- (left_amount says what is left).
CREATE FUNCTION refund_create(p_account bigint, p_payment text, p_charge text, p_amount bigint,
    p_reason text, p_metadata jsonb, p_idem bigint, p_holder text, p_lease_ms bigint,
    OUT result text, OUT left_amount bigint, OUT object text, OUT attempt_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    pid bigint;
    p payment_intents;
    c payment_transactions;
    amt bigint;
    r refunds;
BEGIN
    PERFORM idempotency_hold(p_idem, p_holder);
    IF p_payment IS NOT NULL THEN
        SELECT id INTO pid FROM payment_intents WHERE public_id = p_payment
            AND account_id = p_account;
    ELSE
        SELECT x.payment_intent_id INTO pid FROM charges x
            WHERE x.public_id = p_charge AND x.account_id = p_account LIMIT 1;
    END IF;
    IF pid IS NULL THEN
        result := 'not_found';
        RETURN;
    END IF;
    SELECT * INTO p FROM payment_intents WHERE id = pid FOR UPDATE;
    -- The charge that holds the money: the one that captured.
    SELECT * INTO c FROM payment_transactions WHERE payment_intent_id = p.id
        AND type IN ('charge', 'authorization') AND status = 'succeeded' AND amount_captured > 0
        ORDER BY id DESC LIMIT 1;
    IF p.status <> 'succeeded' OR c.id IS NULL
       OR (p_charge IS NOT NULL AND c.gateway_transaction_id IS DISTINCT FROM p_charge) THEN
        result := 'not_refundable';
        RETURN;
    END IF;
    left_amount := p.amount_received - p.amount_refunded - p.amount_refund_pending;
    IF left_amount <= 0 THEN
        result := 'already_refunded';
        RETURN;
    END IF;
    amt := coalesce(p_amount, left_amount);
    IF amt > left_amount THEN
        result := 'too_large';
        RETURN;
    END IF;
    -- Held now, under the row lock; the CHECK is the last word.
    UPDATE payment_intents SET amount_refund_pending = amount_refund_pending + amt,
        version = version + 1, updated_at = now()
    WHERE id = p.id AND amount_refunded + amount_refund_pending + amt <= amount_received
    RETURNING * INTO p;
    attempt_id := attempt_open(p, 'refund', amt, c.id, NULL, NULL, c.gateway_provider, p_lease_ms);
    INSERT INTO refunds (public_id, account_id, payment_intent_id, charge_attempt_id, attempt_id,
        amount, currency, status, reason, metadata, transition)
    VALUES ('re_' || replace(gen_random_uuid()::text, '-', ''), p.account_id, p.id, c.id,
        attempt_id, amt, p.currency, 'pending', p_reason, coalesce(p_metadata, '{}'), 'create')
    RETURNING * INTO r;
    UPDATE idempotency_keys SET recovery_point = 'refund_created', resource_id = r.id
        WHERE id = p_idem;
    object := refund_object(r)::text;
    result := 'created';
END
$$;

-- result: canceling (attempt_id: the gateway cancel to send), not_found,
-- not_cancelable (final, or not yet acknowledged by the gateway: its
-- request is still on its way, and only the gateway's answer can say
-- whether it can be stopped).
CREATE FUNCTION refund_cancel(p_account bigint, p_refund text, p_idem bigint, p_holder text,
    p_lease_ms bigint, OUT result text, OUT object text, OUT attempt_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    r refunds;
    p payment_intents;
    a payment_transactions;
BEGIN
    PERFORM idempotency_hold(p_idem, p_holder);
    SELECT * INTO r FROM refunds WHERE public_id = p_refund AND account_id = p_account;
    IF NOT FOUND THEN
        result := 'not_found';
        RETURN;
    END IF;
    SELECT * INTO p FROM payment_intents WHERE id = r.payment_intent_id FOR UPDATE;
    SELECT * INTO r FROM refunds WHERE id = r.id FOR UPDATE;
    SELECT * INTO a FROM payment_transactions WHERE id = r.attempt_id FOR UPDATE;
    object := refund_object(r)::text;
    IF r.status <> 'pending' OR a.status <> 'pending' OR a.gateway_transaction_id IS NULL
       OR EXISTS (SELECT 1 FROM payment_transactions x WHERE x.parent_id = a.id
                  AND x.type = 'refund_cancel' AND x.status = 'pending') THEN
        result := 'not_cancelable';
        RETURN;
    END IF;
    UPDATE payment_intents SET version = version + 1 WHERE id = p.id RETURNING * INTO p;
    attempt_id := attempt_open(p, 'refund_cancel', a.amount, a.id, NULL, NULL, a.gateway_provider,
                               p_lease_ms);
    UPDATE idempotency_keys SET recovery_point = 'refund_cancel_started', resource_id = r.id
        WHERE id = p_idem;
    result := 'canceling';
END
$$;

-- What the gateway says of a refund (p_state: pending, succeeded, failed,
-- canceled), for a refund attempt or a refund_cancel attempt (whose refund
-- is its parent); attempt_apply passes refunds here.
CREATE FUNCTION refund_apply(p_attempt bigint, p_state text, p_gateway_id text, p_reason text,
    OUT applied boolean, OUT object text, OUT status text)
LANGUAGE plpgsql AS $$
DECLARE
    a payment_transactions;
    ra payment_transactions;
    r refunds;
    p payment_intents;
BEGIN
    applied := false;
    SELECT * INTO p FROM payment_intents WHERE id =
        (SELECT payment_intent_id FROM payment_transactions WHERE id = p_attempt) FOR UPDATE;
    SELECT * INTO a FROM payment_transactions WHERE id = p_attempt FOR UPDATE;
    IF a.type = 'refund_cancel' THEN
        SELECT * INTO ra FROM payment_transactions WHERE id = a.parent_id FOR UPDATE;
    ELSE
        ra := a;
    END IF;
    SELECT * INTO r FROM refunds WHERE attempt_id = ra.id FOR UPDATE;
    IF a.type = 'refund_cancel' AND a.status = 'pending' AND p_state <> 'pending' THEN
        UPDATE payment_transactions SET status = CASE p_state WHEN 'canceled' THEN 'succeeded'
            ELSE 'failed' END,
            failure_code = CASE WHEN p_state <> 'canceled' THEN 'refund_not_cancelable' END
        WHERE id = a.id;
        applied := true;
    END IF;
    IF ra.status = 'pending' AND p_state = 'pending' THEN
        -- Acknowledged by the gateway, settles later (a callback, or a re-drive).
        UPDATE payment_transactions SET gateway_transaction_id =
            coalesce(gateway_transaction_id, nullif(p_gateway_id, ''))
        WHERE id = ra.id AND a.type = 'refund';
    ELSIF ra.status = 'pending' AND p_state IN ('succeeded', 'failed', 'canceled') THEN
        UPDATE payment_transactions SET status = p_state,
            gateway_transaction_id = coalesce(gateway_transaction_id,
                CASE WHEN a.type = 'refund' THEN nullif(p_gateway_id, '') END),
            failure_code = CASE WHEN p_state = 'failed' THEN coalesce(p_reason, 'unknown') END
        WHERE id = ra.id;
        UPDATE refunds SET status = p_state, transition = 'refund.' || p_state,
            failure_reason = CASE WHEN p_state = 'failed' THEN coalesce(p_reason, 'unknown') END
        WHERE id = r.id RETURNING * INTO r;
        UPDATE payment_intents SET amount_refund_pending = amount_refund_pending - ra.amount,
            amount_refunded = amount_refunded + CASE p_state WHEN 'succeeded' THEN ra.amount
                                                              ELSE 0 END,
            version = version + 1, updated_at = now()
        WHERE id = p.id;
        applied := true;
    ELSIF r.status = 'succeeded' AND p_state = 'failed' AND a.type = 'refund' THEN
        -- Failed after it succeeded (the gateway could not pay it out): the
        -- amount is the merchant's again, and refundable again. The attempt
        -- stays what the gateway first answered.
        UPDATE refunds SET status = 'failed', transition = 'refund.reversed',
            failure_reason = coalesce(p_reason, 'unknown')
        WHERE id = r.id RETURNING * INTO r;
        UPDATE payment_intents SET amount_refunded = amount_refunded - ra.amount,
            version = version + 1, updated_at = now()
        WHERE id = p.id;
        applied := true;
    END IF;
    object := refund_object(r)::text;
    status := r.status;
END
$$;

-- Every gateway outcome still enters through attempt_apply; a refund's goes
-- on to refund_apply, a payment's to what was attempt_apply.
ALTER FUNCTION attempt_apply(bigint, text, text, bigint, text, text, text, text, bigint)
    RENAME TO attempt_apply_payment;
CREATE FUNCTION attempt_apply(p_attempt bigint, p_state text, p_gateway_id text, p_amount bigint,
    p_code text, p_decline text, p_message text, p_first_provider text, p_lease_ms bigint,
    p_idem bigint DEFAULT NULL, p_holder text DEFAULT NULL, p_route text DEFAULT NULL,
    OUT applied boolean, OUT object text, OUT status text, OUT next_attempt bigint,
    OUT age_us bigint, OUT received bigint, OUT answer_code integer, OUT answer_body text)
LANGUAGE plpgsql AS $$
DECLARE
    a record;
BEGIN
    IF (SELECT type FROM payment_transactions WHERE id = p_attempt) IN ('refund', 'refund_cancel') THEN
        SELECT x.applied, x.object, x.status INTO applied, object, status
            FROM refund_apply(p_attempt, p_state, p_gateway_id,
                              coalesce(nullif(p_decline, ''), nullif(p_code, ''))) x;
    ELSE
        SELECT * INTO applied, object, status, next_attempt, age_us, received
            FROM attempt_apply_payment(p_attempt, p_state, p_gateway_id, p_amount, p_code,
                                       p_decline, p_message, p_first_provider, p_lease_ms);
    END IF;
    -- The request that started this job is answered by this very outcome
    -- (no further attempt, nothing left pending): its answer is kept under
    -- its Idempotency-Key in this same transaction.
    IF p_idem IS NOT NULL AND next_attempt IS NULL AND status <> 'processing' THEN
        SELECT * INTO a FROM api_answer(p_route, object::json);
        SELECT x.code, x.body INTO answer_code, answer_body
            FROM idempotency_store(p_idem, a.code, a.body, p_holder) x;
    END IF;
END
$$;
