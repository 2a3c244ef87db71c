-- One state machine, and gateway attempts that stay open until final.
--
-- payment_transitions and attempt_transitions hold the tables of
-- common/paystate.c; `paymentctl migrate` fills them after the migrations,
-- so the table lives in one place. A trigger checks every status change of
-- a payment against payment_transitions — the writer names its event in
-- the `transition` column — and writes the outbox event (and the saga's
-- outcome message) the table names, so every state change has exactly one
-- event and an illegal change is an error. Every gateway operation that can
-- move money is a payment_transactions row (an attempt) with its own
-- idempotency key and status; a payment has at most one attempt pending
-- (an answer outstanding) and is `processing` exactly while it has one.
-- Charges and authorizations stay open (requires_action, requires_capture)
-- until final at the gateway; a new charge is sent only when no earlier one
-- is open (an open one is voided first), capture and void name the attempt
-- that holds the authorization, and canceling or expiring a payment voids
-- its open charge. The functions below are the only writers of a payment's
-- status; the api, workers, callbacks and sweeps call them.

CREATE TABLE payment_transitions (
    from_status   text NOT NULL,
    event         text NOT NULL,
    to_status     text NOT NULL,
    outbox_event  text,
    PRIMARY KEY (from_status, event)
);

CREATE TABLE attempt_transitions (
    type         text NOT NULL,
    from_status  text NOT NULL,
    to_status    text NOT NULL,
    PRIMARY KEY (type, from_status, to_status)
);

ALTER TABLE payment_intents ADD COLUMN transition text;
ALTER TABLE payment_intents ADD COLUMN last_transition text;

-- ---- attempts: payment_transactions rows with a key and an open state ----

ALTER TABLE payment_transactions DROP CONSTRAINT payment_transactions_type_check;
ALTER TABLE payment_transactions DROP CONSTRAINT payment_transactions_status_check;
ALTER TABLE payment_transactions
    ADD COLUMN idempotency_key text,
    ADD COLUMN parent_id bigint REFERENCES payment_transactions (id),
    ADD COLUMN purpose text CHECK (purpose IN ('cancel', 'expire', 'reconfirm')),
    ADD COLUMN reason text,
    ADD COLUMN payment_method text,
    ADD COLUMN amount_captured bigint NOT NULL DEFAULT 0 CHECK (amount_captured >= 0),
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN providers_tried text[] NOT NULL DEFAULT '{}',
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- Rows written before attempts existed were outcomes only: bring them to
-- the attempts' meaning. A 'cancel' is a void; an authorization that
-- 'succeeded' was authorized (held while its payment still waits for
-- capture); a charge or capture that succeeded captured its amount; a
-- 3-D Secure row stays open: the gateway may still complete it (a callback
-- for it is then recorded on it, and the consistency check counts it).
UPDATE payment_transactions SET type = 'void' WHERE type = 'cancel';
UPDATE payment_transactions t SET type = 'charge'
    FROM payment_intents p
    WHERE p.id = t.payment_intent_id AND t.type = 'authorization' AND t.status = 'requires_action'
      AND p.capture_method = 'automatic';
UPDATE payment_transactions t SET status = CASE p.status
        WHEN 'requires_capture' THEN 'requires_capture'
        WHEN 'canceled' THEN 'canceled'
        ELSE 'succeeded' END
    FROM payment_intents p
    WHERE p.id = t.payment_intent_id AND t.type = 'authorization' AND t.status = 'succeeded';
UPDATE payment_transactions SET amount_captured = amount
    WHERE type IN ('charge', 'capture') AND status = 'succeeded';
-- A captured authorization carries what its captures took (refunds find the
-- charge that holds the money by it).
UPDATE payment_transactions t SET amount_captured = c.captured
    FROM (SELECT payment_intent_id, sum(amount) AS captured FROM payment_transactions
          WHERE type = 'capture' AND status = 'succeeded' GROUP BY payment_intent_id) c
    WHERE t.payment_intent_id = c.payment_intent_id AND t.type = 'authorization'
      AND t.status = 'succeeded';
-- A payment in processing had a job out under the key the old worker used.
INSERT INTO payment_transactions (transaction_id, payment_intent_id, type, status, amount, currency,
        gateway_provider, idempotency_key, payment_method, lease_until)
    SELECT 'txn_' || replace(gen_random_uuid()::text, '-', ''), p.id,
           CASE p.capture_method WHEN 'manual' THEN 'authorization' ELSE 'charge' END, 'pending',
           p.amount, p.currency, coalesce(p.gateway_provider, 'sim'),
           p.public_id || ':confirm:' || p.version, p.payment_method, now()
    FROM payment_intents p WHERE p.status = 'processing';

ALTER TABLE payment_transactions
    ADD CONSTRAINT payment_transactions_type_check
        CHECK (type IN ('charge', 'authorization', 'capture', 'void', 'refund')),
    ADD CONSTRAINT payment_transactions_status_check
        CHECK (status IN ('pending', 'requires_action', 'requires_capture', 'succeeded', 'failed',
                          'canceled'));
CREATE UNIQUE INDEX payment_transactions_key ON payment_transactions (idempotency_key);
-- One gateway operation in flight per payment (refunds have their own rules).
CREATE UNIQUE INDEX payment_transactions_in_flight ON payment_transactions (payment_intent_id)
    WHERE status = 'pending' AND type <> 'refund';
-- The sweeps re-drive attempts whose lease ran out.
CREATE INDEX payment_transactions_lease ON payment_transactions (lease_until)
    WHERE status = 'pending';

-- The sweeps find work through the attempts now; requires_capture expires too.
-- Every update of a payment changes its status; an index whose key or
-- predicate holds a column that changes would make each of them rewrite
-- every index (no HOT update). expires_at is set only while the payment can
-- expire (the transition trigger keeps it), so a create+confirm that
-- succeeds never touches it; the charge ids live on the attempts.
DROP INDEX payment_intents_processing;
DROP INDEX payment_intents_expiring;
DROP INDEX payment_intents_latest_charge;
CREATE INDEX payment_intents_expiring ON payment_intents (expires_at)
    WHERE expires_at IS NOT NULL;
UPDATE payment_intents SET expires_at = NULL
    WHERE status NOT IN ('requires_payment_method', 'requires_confirmation', 'requires_action',
                         'requires_capture');
ALTER TABLE payment_intents SET (fillfactor = 85);
-- Authorizations made before never expired: they get their 7 days from now.
UPDATE payment_intents SET expires_at = now() + interval '7 days'
    WHERE status = 'requires_capture';

-- ---- the state machine, enforced ----

CREATE FUNCTION payment_next(p_from text, p_event text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT to_status FROM payment_transitions WHERE from_status = p_from AND event = p_event
$$;

-- The succeeded charge or capture a payment was paid by, for the saga.
CREATE FUNCTION payment_paid_by(p_payment bigint) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT transaction_id FROM payment_transactions WHERE payment_intent_id = p_payment
      AND type IN ('charge', 'capture') AND status = 'succeeded' ORDER BY id DESC LIMIT 1
$$;

-- The outbox event a transition names, and the saga's outcome message for
-- an order's payment, after the payment's own event.
CREATE FUNCTION payment_intents_announce(p payment_intents, p_from text, t payment_transitions)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF t.outbox_event IS NOT NULL THEN
        PERFORM outbox_event(p.account_id, t.outbox_event, payment_intent_object(p), p.public_id);
    END IF;
    -- The order hears its payment's outcome: PaymentFailed once (a decline,
    -- then a cancel, is one failure), and PaymentCompleted when it is paid,
    -- even after a failure (the merchant confirmed it again with a new card).
    IF p.order_id IS NOT NULL AND p_from <> ''
       AND (p.status IN ('succeeded', 'canceled') OR t.event = 'charge.failed')
       AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.aggregate_id = p.public_id
                       AND o.aggregate_type = 'order'
                       AND o.type = CASE WHEN p.status = 'succeeded' THEN 'PaymentCompleted'
                                         ELSE 'PaymentFailed' END) THEN
        PERFORM saga_outcome_event(p, payment_paid_by(p.id),
                                   coalesce(p.last_payment_error ->> 'message',
                                            p.cancellation_reason));
    END IF;
END
$$;

CREATE FUNCTION payment_intents_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    t payment_transitions;
    v_from text := CASE WHEN TG_OP = 'INSERT' THEN '' ELSE OLD.status END;
BEGIN
    IF NEW.transition IS NULL THEN
        IF TG_OP = 'UPDATE' AND NEW.status = OLD.status THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'payment %: status % -> % without a transition', NEW.public_id,
            v_from, NEW.status USING ERRCODE = 'PD002';
    END IF;
    SELECT * INTO t FROM payment_transitions WHERE from_status = v_from AND event = NEW.transition;
    IF NOT FOUND OR t.to_status <> NEW.status THEN
        RAISE EXCEPTION 'payment %: illegal transition % --%--> %', NEW.public_id,
            v_from, NEW.transition, NEW.status USING ERRCODE = 'PD002';
    END IF;
    NEW.last_transition := NEW.transition;
    NEW.transition := NULL;
    -- When it expires: 24 h after creation while open, 7 days after an
    -- authorization, never once final; a payment in flight keeps what it had.
    NEW.expires_at := CASE
        WHEN NEW.status IN ('succeeded', 'canceled') THEN NULL
        WHEN NEW.status = 'requires_capture' AND v_from <> 'requires_capture'
            THEN now() + interval '7 days'
        WHEN NEW.status IN ('requires_payment_method', 'requires_confirmation', 'requires_action')
            THEN coalesce(NEW.expires_at, NEW.created_at + interval '24 hours')
        ELSE NEW.expires_at END;
    -- A new row's event is written once it is certainly inserted (AFTER
    -- INSERT: an INSERT ... ON CONFLICT DO NOTHING fires this trigger too).
    IF TG_OP = 'UPDATE' THEN
        PERFORM payment_intents_announce(NEW, v_from, t);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER payment_intents_transition BEFORE INSERT OR UPDATE ON payment_intents
    FOR EACH ROW EXECUTE FUNCTION payment_intents_transition();

CREATE FUNCTION payment_intents_created() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    t payment_transitions;
BEGIN
    SELECT * INTO t FROM payment_transitions WHERE from_status = '' AND event = NEW.last_transition;
    PERFORM payment_intents_announce(NEW, '', t);
    RETURN NULL;
END
$$;
CREATE TRIGGER payment_intents_created AFTER INSERT ON payment_intents
    FOR EACH ROW EXECUTE FUNCTION payment_intents_created();

CREATE FUNCTION payment_transactions_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status <> 'pending' THEN
            RAISE EXCEPTION 'attempt %: a new attempt is pending, not %', NEW.transaction_id,
                NEW.status USING ERRCODE = 'PD003';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.type <> OLD.type OR NEW.amount <> OLD.amount OR NEW.payment_intent_id <> OLD.payment_intent_id
       OR NEW.idempotency_key IS DISTINCT FROM OLD.idempotency_key THEN
        RAISE EXCEPTION 'attempt %: type, amount, payment and key never change', OLD.transaction_id
            USING ERRCODE = 'PD003';
    END IF;
    IF NEW.status <> OLD.status THEN
        PERFORM 1 FROM attempt_transitions
            WHERE type = NEW.type AND from_status = OLD.status AND to_status = NEW.status;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'attempt % (%): illegal change % -> %', OLD.transaction_id, OLD.type,
                OLD.status, NEW.status USING ERRCODE = 'PD003';
        END IF;
        NEW.updated_at := now();
        IF NEW.status <> 'pending' THEN
            NEW.lease_until := NULL;
            NEW.processed_at := coalesce(NEW.processed_at, now());
        END IF;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER payment_transactions_transition BEFORE INSERT OR UPDATE ON payment_transactions
    FOR EACH ROW EXECUTE FUNCTION payment_transactions_transition();

CREATE FUNCTION attempt_allowed(p_type text, p_from text, p_to text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_from = p_to OR EXISTS (SELECT 1 FROM attempt_transitions
        WHERE type = p_type AND from_status = p_from AND to_status = p_to)
$$;

-- ---- idempotency claims are fenced ----

-- Every write under an Idempotency-Key claim first checks, under the key
-- row's lock, that this request still holds it: a claim taken over from a
-- holder presumed dead makes that holder's late statements fail whole.
CREATE FUNCTION idempotency_hold(p_row bigint, p_holder text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_row IS NULL THEN
        -- A holder without its key's row would run unguarded: a retry
        -- under the same key could do it again.
        IF p_holder IS NOT NULL THEN
            RAISE EXCEPTION 'request % holds an Idempotency-Key but no claim', p_holder
                USING ERRCODE = 'PD012';
        END IF;
        RETURN;
    END IF;
    PERFORM 1 FROM idempotency_keys
        WHERE id = p_row AND locked_by = p_holder AND response_code IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency claim % is no longer held by this request', p_row
            USING ERRCODE = 'PD010';
    END IF;
END
$$;

-- The claim of a key, taken by the statement that does the request's work
-- (create, confirm): one commit for both. A key that exists already raises
-- PD011 and writes nothing; the api then decides from the row (a replay,
-- other parameters, in flight, its holder gone).
CREATE FUNCTION idempotency_take(p_account bigint, p_claim jsonb, p_holder text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    r bigint;
BEGIN
    INSERT INTO idempotency_keys (account_id, idempotency_key, request_method, request_path,
        request_hash, locked_at, locked_by)
    VALUES (p_account, p_claim ->> 'key', p_claim ->> 'method', p_claim ->> 'path',
        decode(p_claim ->> 'hash', 'hex'), now(), p_holder)
    ON CONFLICT (account_id, idempotency_key) DO NOTHING RETURNING id INTO r;
    IF r IS NULL THEN
        RAISE EXCEPTION 'idempotency key exists' USING ERRCODE = 'PD011';
    END IF;
    RETURN r;
END
$$;

-- The answer kept under a key, written once: the first writer (the worker
-- with the outcome, or the api with "processing" after CONFIRM_WAIT_MS)
-- wins, and both send what was kept, so a replay is the first answer byte
-- for byte. A claim taken over keeps nothing of this request (NULLs).
CREATE FUNCTION idempotency_store(p_row bigint, p_code integer, p_body text, p_holder text,
    OUT code integer, OUT body text)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE idempotency_keys SET response_code = p_code, response_body = p_body,
        locked_at = NULL, recovery_point = 'finished'
    WHERE id = p_row AND locked_by = p_holder AND response_code IS NULL
    RETURNING response_code, response_body INTO code, body;
    IF NOT FOUND THEN
        SELECT response_code, response_body INTO code, body FROM idempotency_keys
            WHERE id = p_row AND locked_by = p_holder;
    END IF;
END
$$;

-- What the api answers for an operation's outcome (route: create or
-- confirm, capture, cancel, refund), as Stripe does: a declined create or
-- confirm is 402 card_error with the intent; a capture the gateway refused
-- 400; a cancel that lost to a completed charge 400.
CREATE FUNCTION api_answer(p_route text, p_object json, OUT code integer, OUT body text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    st text := p_object ->> 'status';
    err jsonb;
BEGIN
    code := 200;
    body := p_object::text;
    IF p_object ->> 'object' <> 'payment_intent' THEN
        RETURN;
    END IF;
    IF p_route IN ('create', 'confirm') AND st = 'requires_payment_method'
       AND json_typeof(p_object -> 'last_payment_error') = 'object' THEN
        code := 402;
        err := (p_object -> 'last_payment_error')::jsonb
               || jsonb_build_object('payment_intent', p_object::jsonb);
    ELSIF p_route = 'capture' AND st = 'requires_capture' THEN
        code := 400;
        err := jsonb_build_object('type', 'invalid_request_error', 'code', 'capture_refused',
            'message', 'The payment gateway refused to capture this PaymentIntent; its '
                       'authorization stands and can be captured again or canceled.');
    ELSIF p_route = 'capture' AND st = 'canceled' THEN
        code := 400;
        err := jsonb_build_object('type', 'invalid_request_error',
            'code', 'charge_expired_for_capture',
            'message', 'The authorization of this PaymentIntent expired or was voided at the '
                       'gateway; it was canceled and nothing was captured.');
    ELSIF (p_route = 'capture' AND st NOT IN ('succeeded', 'processing'))
          OR (p_route = 'cancel' AND st NOT IN ('canceled', 'processing')) THEN
        code := 400;
        err := jsonb_build_object('type', 'invalid_request_error',
            'code', 'payment_intent_unexpected_state',
            'message', format('You cannot %s this PaymentIntent because it has a status of %s.',
                              p_route, st));
    END IF;
    IF err IS NOT NULL THEN
        body := jsonb_build_object('error', err)::text;
    END IF;
END
$$;

CREATE FUNCTION idempotency_progress(p_row bigint, p_point text, p_resource bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE idempotency_keys SET recovery_point = p_point, resource_id = p_resource
        WHERE id = p_row
$$;

-- ---- attempts ----

-- A new pending attempt under the payment's current version, so its key
-- (payment:operation:version) is its own and a re-sent job reuses it.
CREATE FUNCTION attempt_open(p payment_intents, p_type text, p_amount bigint, p_parent bigint,
    p_purpose text, p_reason text, p_provider text, p_lease_ms bigint) RETURNS bigint
LANGUAGE sql AS $$
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
    RETURNING id
$$;

-- The charge a payment may still be charged by: requires_action or requires_capture.
CREATE FUNCTION attempt_open_charge(p_payment bigint) RETURNS payment_transactions
LANGUAGE sql STABLE AS $$
    SELECT * FROM payment_transactions WHERE payment_intent_id = p_payment
      AND type IN ('charge', 'authorization') AND status IN ('requires_action', 'requires_capture')
    ORDER BY id DESC LIMIT 1
$$;

-- What a confirm sends first: a void of a charge still open (an abandoned
-- 3-D Secure), never a second live charge; else the new charge.
CREATE FUNCTION attempt_first(p payment_intents, p_provider text, p_lease_ms bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    o payment_transactions := attempt_open_charge(p.id);
BEGIN
    IF o.id IS NOT NULL THEN
        RETURN attempt_open(p, 'void', 0, o.id, 'reconfirm', NULL, o.gateway_provider, p_lease_ms);
    END IF;
    RETURN attempt_open(p, CASE p.capture_method WHEN 'manual' THEN 'authorization' ELSE 'charge' END,
                        p.amount, NULL, NULL, NULL, p_provider, p_lease_ms);
END
$$;

-- What a worker needs to run an attempt, by column name.
CREATE VIEW attempt_jobs AS
    SELECT a.id AS attempt_id, a.idempotency_key AS key, a.type, coalesce(a.purpose, '') AS purpose,
           p.id AS intent_id, p.public_id, p.account_id, a.amount, a.currency,
           coalesce(a.payment_method, '') AS payment_method, a.gateway_provider AS provider,
           coalesce(c.gateway_transaction_id, '') AS target,
           coalesce(c.idempotency_key, '') AS target_key
    FROM payment_transactions a
    JOIN payment_intents p ON p.id = a.payment_intent_id
    LEFT JOIN payment_transactions c ON c.id = a.parent_id;

-- One attempt's job, read with a fresh snapshot (VOLATILE): a statement
-- `SELECT ... FROM pi_confirm(...) r LEFT JOIN LATERAL attempt_job(r.attempt_id) j ON true`
-- sees the attempt its own function call just wrote, which a plain join
-- under the statement's snapshot would not.
CREATE FUNCTION attempt_job(p_id bigint) RETURNS SETOF attempt_jobs
LANGUAGE sql VOLATILE AS $$
    SELECT * FROM attempt_jobs WHERE attempt_id = p_id
$$;

-- ---- the api's operations ----

-- p_claim: the Idempotency-Key's claim to take in this same transaction
-- ({key, method, path, hash}), or NULL (no key, or claimed already: p_idem).
CREATE FUNCTION pi_create(p_public text, p_account bigint, p_amount bigint, p_currency text,
    p_customer text, p_description text, p_metadata jsonb, p_capture text, p_pm text,
    p_confirm boolean, p_order text, p_provider text, p_idem bigint, p_holder text,
    p_lease_ms bigint, p_claim jsonb DEFAULT NULL,
    OUT object text, OUT status text, OUT public_id text, OUT attempt_id bigint, OUT created boolean,
    OUT idem_row bigint)
LANGUAGE plpgsql AS $$
DECLARE
    p payment_intents;
BEGIN
    IF p_claim IS NOT NULL THEN
        p_idem := idempotency_take(p_account, p_claim, p_holder);
    END IF;
    idem_row := p_idem;
    PERFORM idempotency_hold(p_idem, p_holder);
    INSERT INTO payment_intents (public_id, account_id, order_id, amount, currency, customer,
        description, metadata, capture_method, payment_method, status, transition,
        gateway_provider)
    VALUES (p_public, p_account, p_order, p_amount, p_currency, p_customer, p_description,
        coalesce(p_metadata, '{}'), coalesce(p_capture, 'automatic'), p_pm,
        CASE WHEN p_confirm THEN 'processing' WHEN p_pm IS NOT NULL THEN 'requires_confirmation'
             ELSE 'requires_payment_method' END,
        CASE WHEN p_confirm THEN 'create.confirm' WHEN p_pm IS NOT NULL
             THEN 'create.with_payment_method' ELSE 'create' END,
        CASE WHEN p_confirm THEN p_provider END)
    ON CONFLICT (account_id, order_id) WHERE order_id IS NOT NULL DO NOTHING
    RETURNING * INTO p;
    IF NOT FOUND THEN -- this order has its payment already
        SELECT * INTO p FROM payment_intents
            WHERE payment_intents.account_id = p_account AND order_id = p_order;
        object := payment_intent_object(p)::text;
        status := p.status;
        public_id := p.public_id;
        created := false;
        RETURN;
    END IF;
    IF p_confirm THEN
        attempt_id := attempt_first(p, p_provider, p_lease_ms);
    END IF;
    PERFORM idempotency_progress(p_idem, 'created', p.id);
    object := payment_intent_object(p)::text;
    status := p.status;
    public_id := p.public_id;
    created := true;
END
$$;

-- An operation's start: its key's claim checked, the intent locked (a row
-- of NULLs when the account has no such intent).
CREATE FUNCTION pi_lock(p_public text, p_account bigint, p_idem bigint, p_holder text)
RETURNS payment_intents
LANGUAGE plpgsql AS $$
DECLARE
    p payment_intents;
BEGIN
    PERFORM idempotency_hold(p_idem, p_holder);
    SELECT * INTO p FROM payment_intents WHERE public_id = p_public AND account_id = p_account
        FOR UPDATE;
    RETURN p;
END
$$;

-- refused: NULL when updated, else why (the status, or 'locked_in_action').
CREATE FUNCTION pi_update(p_public text, p_account bigint, p_amount bigint, p_currency text,
    p_set_customer boolean, p_customer text, p_set_description boolean, p_description text,
    p_clear_metadata boolean, p_metadata jsonb, p_pm text, p_capture text, p_idem bigint,
    p_holder text,
    OUT is_found boolean, OUT status_before text, OUT refused text, OUT object text)
LANGUAGE plpgsql AS $$
DECLARE
    p payment_intents;
BEGIN
    p := pi_lock(p_public, p_account, p_idem, p_holder);
    is_found := p.id IS NOT NULL;
    IF NOT is_found THEN
        RETURN;
    END IF;
    status_before := p.status;
    IF p.status NOT IN ('requires_payment_method', 'requires_confirmation', 'requires_action') THEN
        refused := p.status;
        RETURN;
    END IF;
    -- The pending 3-D Secure charge is for this amount, method and capture:
    -- changing them now would leave it chargeable for what no longer holds.
    IF p.status = 'requires_action' AND (p_amount IS NOT NULL OR p_currency IS NOT NULL
       OR p_pm IS NOT NULL OR p_capture IS NOT NULL) THEN
        refused := 'locked_in_action';
        RETURN;
    END IF;
    UPDATE payment_intents SET
        amount = coalesce(p_amount, amount),
        currency = coalesce(p_currency, currency),
        customer = CASE WHEN p_set_customer THEN nullif(p_customer, '') ELSE customer END,
        description = CASE WHEN p_set_description THEN nullif(p_description, '') ELSE description END,
        metadata = CASE WHEN p_clear_metadata THEN '{}'::jsonb
                        ELSE jsonb_strip_nulls(metadata || coalesce(p_metadata, '{}'::jsonb)) END,
        payment_method = coalesce(p_pm, payment_method),
        capture_method = coalesce(p_capture, capture_method),
        status = CASE WHEN p_pm IS NOT NULL AND p.status = 'requires_payment_method'
                      THEN 'requires_confirmation' ELSE p.status END,
        transition = CASE WHEN p_pm IS NOT NULL AND p.status = 'requires_payment_method'
                          THEN 'attach_payment_method' END,
        version = version + 1, updated_at = now()
    WHERE id = p.id RETURNING * INTO p;
    PERFORM idempotency_progress(p_idem, 'updated', p.id);
    object := payment_intent_object(p)::text;
END
$$;

CREATE FUNCTION pi_confirm(p_public text, p_account bigint, p_pm text, p_capture text,
    p_provider text, p_idem bigint, p_holder text, p_lease_ms bigint, p_claim jsonb DEFAULT NULL,
    OUT is_found boolean, OUT status_before text, OUT has_pm boolean, OUT object text,
    OUT attempt_id bigint, OUT idem_row bigint)
LANGUAGE plpgsql AS $$
DECLARE
    p payment_intents;
BEGIN
    IF p_claim IS NOT NULL THEN
        p_idem := idempotency_take(p_account, p_claim, p_holder);
    END IF;
    idem_row := p_idem;
    p := pi_lock(p_public, p_account, p_idem, p_holder);
    is_found := p.id IS NOT NULL;
    IF NOT is_found THEN
        RETURN;
    END IF;
    status_before := p.status;
    has_pm := coalesce(p_pm, p.payment_method) IS NOT NULL;
    IF payment_next(p.status, 'confirm') IS NULL OR NOT has_pm THEN
        RETURN;
    END IF;
    UPDATE payment_intents SET status = payment_next(p.status, 'confirm'), transition = 'confirm',
        payment_method = coalesce(p_pm, payment_method),
        capture_method = coalesce(p_capture, capture_method), gateway_provider = p_provider,
        last_payment_error = NULL, next_action = NULL, version = version + 1, updated_at = now()
    WHERE id = p.id RETURNING * INTO p;
    attempt_id := attempt_first(p, p_provider, p_lease_ms);
    PERFORM idempotency_progress(p_idem, 'confirm_started', p.id);
    object := payment_intent_object(p)::text;
END
$$;

-- attempt_id NULL with status_before requires_capture: amount over capturable.
CREATE FUNCTION pi_capture(p_public text, p_account bigint, p_amount bigint, p_idem bigint,
    p_holder text, p_lease_ms bigint,
    OUT is_found boolean, OUT status_before text, OUT capturable bigint, OUT object text,
    OUT attempt_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    p payment_intents;
    auth payment_transactions;
BEGIN
    p := pi_lock(p_public, p_account, p_idem, p_holder);
    is_found := p.id IS NOT NULL;
    IF NOT is_found THEN
        RETURN;
    END IF;
    status_before := p.status;
    capturable := p.amount_capturable;
    IF payment_next(p.status, 'capture') IS NULL OR coalesce(p_amount, 0) > p.amount_capturable THEN
        RETURN;
    END IF;
    auth := attempt_open_charge(p.id);
    IF auth.id IS NULL OR auth.status <> 'requires_capture' THEN
        RAISE EXCEPTION 'payment %: requires_capture without an open authorization', p.public_id
            USING ERRCODE = 'PD004';
    END IF;
    UPDATE payment_intents SET status = payment_next(p.status, 'capture'), transition = 'capture',
        version = version + 1, updated_at = now()
    WHERE id = p.id RETURNING * INTO p;
    attempt_id := attempt_open(p, 'capture', coalesce(p_amount, p.amount_capturable), auth.id, NULL,
                               NULL, auth.gateway_provider, p_lease_ms);
    PERFORM idempotency_progress(p_idem, 'capture_started', p.id);
    object := payment_intent_object(p)::text;
END
$$;

CREATE FUNCTION pi_cancel(p_public text, p_account bigint, p_reason text, p_idem bigint,
    p_holder text, p_lease_ms bigint,
    OUT is_found boolean, OUT status_before text, OUT object text, OUT attempt_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    p payment_intents;
    o payment_transactions;
    nxt text;
BEGIN
    p := pi_lock(p_public, p_account, p_idem, p_holder);
    is_found := p.id IS NOT NULL;
    IF NOT is_found THEN
        RETURN;
    END IF;
    status_before := p.status;
    nxt := payment_next(p.status, 'cancel');
    IF nxt IS NULL THEN
        RETURN;
    END IF;
    IF nxt = 'canceled' THEN
        UPDATE payment_intents SET status = nxt, transition = 'cancel', cancellation_reason = p_reason,
            canceled_at = now(), next_action = NULL, version = version + 1, updated_at = now()
        WHERE id = p.id RETURNING * INTO p;
    ELSE -- a charge is open at the gateway: void it first
        o := attempt_open_charge(p.id);
        IF o.id IS NULL THEN
            RAISE EXCEPTION 'payment %: % without an open charge', p.public_id, p.status
                USING ERRCODE = 'PD004';
        END IF;
        UPDATE payment_intents SET status = nxt, transition = 'cancel', version = version + 1,
            updated_at = now()
        WHERE id = p.id RETURNING * INTO p;
        attempt_id := attempt_open(p, 'void', 0, o.id, 'cancel', p_reason, o.gateway_provider,
                                   p_lease_ms);
    END IF;
    PERFORM idempotency_progress(p_idem, 'cancel_started', p.id);
    object := payment_intent_object(p)::text;
END
$$;

-- ---- gateway outcomes: workers, re-drives and callbacks ----

-- A charge's outcome (state as the gateway reports it: requires_action,
-- requires_capture, succeeded, failed, or rejected = refused, never
-- charged) applied to the charge attempt and to its payment.
CREATE FUNCTION attempt_settle_charge(p payment_intents, a payment_transactions, p_state text,
    p_gateway_id text, p_amount bigint, p_code text, p_decline text, p_message text)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    st text := CASE WHEN p_state IN ('rejected', 'canceled') THEN 'failed' ELSE p_state END;
    ev text;
    amt bigint := 0;
    lpe jsonb;
BEGIN
    ev := CASE st WHEN 'requires_action' THEN 'charge.requires_action'
                  WHEN 'requires_capture' THEN 'charge.authorized'
                  WHEN 'succeeded' THEN 'charge.captured'
                  WHEN 'failed' THEN 'charge.failed' END;
    IF ev IS NULL OR NOT attempt_allowed(a.type, a.status, st)
       OR payment_next(p.status, ev) IS NULL THEN
        -- Not a move the tables know (an automatic charge only authorized,
        -- an authorization captured without a capture): the gateway's word
        -- is kept in the log and nothing changes.
        RAISE WARNING 'attempt % (%): gateway state % not applied (attempt %, payment %)',
            a.transaction_id, a.type, p_state, a.status, p.status;
        RETURN false;
    END IF;
    IF st = 'succeeded' THEN
        amt := coalesce(nullif(p_amount, 0), nullif(a.amount_captured, 0), a.amount);
    END IF;
    IF st = 'failed' THEN
        lpe := CASE WHEN p_state = 'rejected' THEN
                   jsonb_build_object('type', 'api_error', 'code', 'processing_error', 'message',
                                      'The payment gateway could not process this payment.')
               ELSE jsonb_strip_nulls(jsonb_build_object('type', 'card_error',
                   'code', coalesce(nullif(p_code, ''), 'card_declined'),
                   'decline_code', nullif(p_decline, ''),
                   'message', coalesce(nullif(p_message, ''), 'Your card was declined.'),
                   'payment_method', jsonb_build_object('id', a.payment_method,
                                                        'object', 'payment_method', 'type', 'card')))
               END;
    END IF;
    UPDATE payment_transactions SET status = st,
        gateway_transaction_id = coalesce(nullif(p_gateway_id, ''), gateway_transaction_id),
        amount_captured = amt,
        failure_code = CASE WHEN st = 'failed' THEN coalesce(nullif(p_decline, ''),
                           nullif(p_code, ''), CASE WHEN p_state = 'rejected'
                           THEN 'processing_error' END) END,
        failure_message = CASE WHEN st = 'failed' THEN p_message END
    WHERE id = a.id;
    UPDATE payment_intents SET status = coalesce(payment_next(p.status, ev), p.status),
        transition = ev,
        amount_received = amount_received + amt,
        amount_capturable = CASE WHEN st = 'requires_capture' THEN a.amount ELSE 0 END,
        last_payment_error = lpe,
        next_action = CASE WHEN st = 'requires_action' THEN
            '{"type":"use_stripe_sdk","use_stripe_sdk":{"type":"three_d_secure_redirect"}}'::jsonb END,
        -- The charge that stands says how it was paid (a re-confirm may have
        -- named another method before its void found this one completed).
        payment_method = CASE WHEN st = 'failed' THEN NULL
                              ELSE coalesce(a.payment_method, payment_method) END,
        capture_method = CASE a.type WHEN 'authorization' THEN 'manual' ELSE 'automatic' END,
        latest_charge = coalesce(nullif(p_gateway_id, ''), a.gateway_transaction_id, latest_charge),
        gateway_provider = a.gateway_provider,
        version = version + 1, updated_at = now()
    WHERE id = p.id;
    RETURN true;
END
$$;

-- What the gateway said about attempt p_attempt (a worker's answer, a
-- re-drive's retrieve, or a callback about the charge): p_state is the
-- state of the charge the attempt concerns — requires_action,
-- requires_capture, succeeded (captured), failed, canceled (voided),
-- pending (accepted, settles later), or rejected (a charge request refused:
-- certainly not charged). For a capture, requires_capture means refused
-- with the authorization standing; for a void, anything but canceled or
-- failed means the charge moved on before the void reached it, and it
-- stands. An attempt already final changes nothing (a late or repeated
-- answer). next_attempt is the charge a re-confirm sends once the old
-- charge is voided.
CREATE FUNCTION attempt_apply(p_attempt bigint, p_state text, p_gateway_id text, p_amount bigint,
    p_code text, p_decline text, p_message text, p_first_provider text, p_lease_ms bigint,
    OUT applied boolean, OUT object text, OUT status text, OUT next_attempt bigint,
    OUT age_us bigint, OUT received bigint)
LANGUAGE plpgsql AS $$
DECLARE
    p payment_intents;
    a payment_transactions;
    c payment_transactions;
    pend payment_transactions;
    amt bigint;
    st text;
BEGIN
    applied := false;
    SELECT * INTO p FROM payment_intents WHERE id =
        (SELECT payment_intent_id FROM payment_transactions WHERE id = p_attempt) FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO a FROM payment_transactions WHERE id = p_attempt FOR UPDATE;
    IF a.parent_id IS NOT NULL THEN
        SELECT * INTO c FROM payment_transactions WHERE id = a.parent_id FOR UPDATE;
    END IF;

    IF a.type IN ('charge', 'authorization') AND a.status = 'pending' THEN
        IF p_state = 'pending' THEN
            UPDATE payment_transactions SET gateway_transaction_id =
                coalesce(nullif(p_gateway_id, ''), gateway_transaction_id) WHERE id = a.id;
        ELSE
            applied := attempt_settle_charge(p, a, p_state, p_gateway_id, p_amount, p_code,
                                             p_decline, p_message);
        END IF;

    ELSIF a.type IN ('charge', 'authorization') AND a.status IN ('requires_action', 'requires_capture')
          AND p_state IN ('succeeded', 'requires_capture', 'failed') AND p_state <> a.status THEN
        -- The gateway's later word about an open charge (a callback).
        SELECT * INTO pend FROM payment_transactions WHERE payment_intent_id = p.id
            AND payment_transactions.status = 'pending' AND type <> 'refund' FOR UPDATE;
        IF FOUND AND pend.parent_id = a.id AND pend.type = 'capture' AND p_state = 'succeeded' THEN
            SELECT * INTO applied, object, status, next_attempt, age_us, received FROM attempt_apply(pend.id,
                'succeeded', NULL, p_amount, NULL, NULL, NULL, p_first_provider, p_lease_ms);
            RETURN;
        ELSIF FOUND AND pend.parent_id = a.id AND pend.type = 'void' THEN
            -- Recorded on the charge; the void's own answer decides the payment.
            PERFORM 1 FROM attempt_transitions WHERE type = a.type AND from_status = a.status
                AND to_status = p_state;
            IF FOUND THEN
                UPDATE payment_transactions SET status = p_state,
                    amount_captured = CASE WHEN p_state = 'succeeded'
                        THEN coalesce(nullif(p_amount, 0), amount) ELSE 0 END
                WHERE id = a.id;
                applied := true;
            END IF;
        ELSIF NOT FOUND AND p.status = 'requires_action' AND a.status = 'requires_action'
              AND a.id = (attempt_open_charge(p.id)).id THEN
            applied := attempt_settle_charge(p, a, p_state, p_gateway_id, p_amount, p_code,
                                             p_decline, p_message);
        ELSIF attempt_allowed(a.type, a.status, p_state) THEN
            -- A charge the payment no longer waits on (one abandoned before
            -- attempts were tracked) moved at the gateway: the charge keeps
            -- the gateway's word; the payment does not change, and the
            -- consistency check counts it (money taken or held outside it).
            UPDATE payment_transactions SET status = p_state,
                amount_captured = CASE WHEN p_state = 'succeeded'
                    THEN coalesce(nullif(p_amount, 0), amount) ELSE 0 END
            WHERE id = a.id;
            RAISE WARNING 'attempt %: stray charge % at the gateway for payment % (%)',
                a.transaction_id, p_state, p.public_id, p.status;
        END IF;

    ELSIF a.type = 'capture' AND a.status = 'pending' AND p_state <> 'pending' THEN
        IF p_state = 'succeeded' THEN
            amt := coalesce(nullif(p_amount, 0), a.amount);
            UPDATE payment_transactions SET status = 'succeeded', amount_captured = amt,
                gateway_transaction_id = c.gateway_transaction_id WHERE id = a.id;
            IF c.status = 'requires_capture' THEN
                UPDATE payment_transactions SET status = 'succeeded', amount_captured = amt
                    WHERE id = c.id;
            END IF;
            UPDATE payment_intents SET status = payment_next(p.status, 'capture.succeeded'),
                transition = 'capture.succeeded', amount_received = amount_received + amt,
                amount_capturable = 0, latest_charge = coalesce(c.gateway_transaction_id, latest_charge),
                version = version + 1, updated_at = now()
            WHERE id = p.id;
        ELSIF p_state = 'requires_capture' THEN
            UPDATE payment_transactions SET status = 'failed',
                failure_code = coalesce(nullif(p_code, ''), 'capture_refused'),
                failure_message = p_message WHERE id = a.id;
            UPDATE payment_intents SET status = payment_next(p.status, 'capture.refused'),
                transition = 'capture.refused', version = version + 1, updated_at = now()
            WHERE id = p.id;
        ELSE -- voided, expired or failed at the gateway: nothing left to capture
            UPDATE payment_transactions SET status = 'failed',
                failure_code = coalesce(nullif(p_code, ''), 'charge_expired_for_capture'),
                failure_message = p_message WHERE id = a.id;
            IF c.status = 'requires_capture' THEN
                UPDATE payment_transactions SET status = 'canceled' WHERE id = c.id;
            END IF;
            UPDATE payment_intents SET status = payment_next(p.status, 'authorization.lost'),
                transition = 'authorization.lost', amount_capturable = 0,
                cancellation_reason = 'automatic', canceled_at = now(),
                version = version + 1, updated_at = now()
            WHERE id = p.id;
        END IF;
        applied := true;

    ELSIF a.type = 'void' AND a.status = 'pending' AND p_state <> 'pending' THEN
        IF p_state IN ('canceled', 'failed') THEN -- nothing is held any more
            UPDATE payment_transactions SET status = CASE p_state WHEN 'canceled' THEN 'succeeded'
                ELSE 'failed' END,
                failure_message = CASE WHEN p_state = 'failed'
                    THEN 'the charge had already failed; nothing was held' END
            WHERE id = a.id;
            IF c.status IN ('requires_action', 'requires_capture') THEN
                st := CASE WHEN p_state = 'failed' AND c.status = 'requires_action' THEN 'failed'
                           ELSE 'canceled' END;
                UPDATE payment_transactions SET status = st WHERE id = c.id;
            END IF;
            IF a.purpose = 'reconfirm' THEN
                UPDATE payment_intents SET status = payment_next(p.status, 'void.reconfirm'),
                    transition = 'void.reconfirm', version = version + 1, updated_at = now()
                WHERE id = p.id RETURNING * INTO p;
                next_attempt := attempt_first(p, p_first_provider, p_lease_ms);
            ELSE
                UPDATE payment_intents SET status = payment_next(p.status, 'void.released'),
                    transition = 'void.released', amount_capturable = 0, next_action = NULL,
                    cancellation_reason = coalesce(a.reason,
                        CASE a.purpose WHEN 'expire' THEN 'abandoned' END),
                    canceled_at = now(), version = version + 1, updated_at = now()
                WHERE id = p.id;
            END IF;
        ELSE -- the charge moved on before the void reached it: it stands
            UPDATE payment_transactions SET status = 'failed',
                failure_code = coalesce(nullif(p_code, ''), 'charge_not_cancelable'),
                failure_message = p_message WHERE id = a.id;
            PERFORM attempt_settle_charge(p, c, p_state, c.gateway_transaction_id,
                                          coalesce(nullif(p_amount, 0), nullif(c.amount_captured, 0)),
                                          NULL, NULL, NULL);
            -- An expiry whose void found the charge still open tries again
            -- later, not at every sweep.
            IF a.purpose = 'expire' THEN
                UPDATE payment_intents SET expires_at = now() + interval '1 hour'
                    WHERE id = p.id AND payment_intents.status IN ('requires_action',
                                                                    'requires_capture');
            END IF;
        END IF;
        applied := true;
    END IF;

    SELECT * INTO p FROM payment_intents WHERE id = p.id;
    object := payment_intent_object(p)::text;
    status := p.status;
    age_us := (extract(epoch FROM clock_timestamp() - p.created_at) * 1000000)::bigint;
    received := p.amount_received;
END
$$;

-- A signed gateway callback about a charge: deduped by event id, matched
-- to its attempt by gateway charge id or by the attempt's key, applied
-- through attempt_apply. result: unknown (no attempt: 404, the gateway
-- sends it again), duplicate, ignored (recorded, nothing changed), applied.
CREATE FUNCTION gateway_callback(p_provider text, p_event_id text, p_type text, p_charge text,
    p_key text, p_state text, p_amount bigint, p_code text, p_message text,
    p_first_provider text, p_lease_ms bigint,
    OUT result text, OUT payment text, OUT status_before text, OUT status text)
LANGUAGE plpgsql AS $$
DECLARE
    a_id bigint;
    pid bigint;
    r record;
BEGIN
    -- A refund's callback names the refund; the others the charge.
    SELECT id, payment_intent_id INTO a_id, pid FROM payment_transactions
        WHERE gateway_provider = p_provider AND gateway_transaction_id = p_charge
          AND (type IN ('charge', 'authorization')) = (p_type NOT LIKE 'refund.%') LIMIT 1;
    -- By the attempt's key when the gateway's id is not known for it yet;
    -- never an attempt that already has another gateway id.
    IF a_id IS NULL AND nullif(p_key, '') IS NOT NULL THEN
        SELECT id, payment_intent_id INTO a_id, pid FROM payment_transactions
            WHERE idempotency_key = p_key
              AND (type IN ('charge', 'authorization')) = (p_type NOT LIKE 'refund.%')
              AND (gateway_transaction_id IS NULL OR gateway_transaction_id = p_charge);
    END IF;
    IF a_id IS NULL THEN
        result := 'unknown';
        RETURN;
    END IF;
    SELECT public_id, payment_intents.status INTO payment, status_before FROM payment_intents
        WHERE id = pid FOR UPDATE;
    INSERT INTO gateway_events (provider, event_id, type, payment_intent_id, applied)
        VALUES (p_provider, p_event_id, p_type, pid, false)
        ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        result := 'duplicate';
        status := status_before;
        RETURN;
    END IF;
    -- The charge id is learnt here when the worker's answer was lost.
    UPDATE payment_transactions SET gateway_transaction_id = p_charge
        WHERE id = a_id AND gateway_transaction_id IS NULL;
    SELECT * INTO r FROM attempt_apply(a_id, p_state, p_charge, p_amount, p_code, NULL, p_message,
                                       p_first_provider, p_lease_ms);
    UPDATE gateway_events SET applied = r.applied WHERE provider = p_provider AND event_id = p_event_id;
    result := CASE WHEN r.applied THEN 'applied' ELSE 'ignored' END;
    status := r.status;
END
$$;

-- ---- the sweeps ----

-- Open payments past expires_at: canceled at once when nothing is held,
-- else a void of the open charge is started (one row each; attempt_id
-- NULL for the ones canceled at once).
CREATE FUNCTION pi_expire(p_limit integer, p_lease_ms bigint)
RETURNS TABLE (public_id text, attempt_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    p payment_intents;
    o payment_transactions;
    nxt text;
BEGIN
    FOR p IN SELECT * FROM payment_intents x WHERE x.status IN ('requires_payment_method',
                 'requires_confirmation', 'requires_action', 'requires_capture')
               AND x.expires_at < now() ORDER BY x.expires_at LIMIT p_limit
               FOR UPDATE SKIP LOCKED LOOP
        nxt := payment_next(p.status, 'expire');
        public_id := p.public_id;
        attempt_id := NULL;
        IF nxt = 'canceled' THEN
            UPDATE payment_intents SET status = nxt, transition = 'expire',
                cancellation_reason = 'abandoned', canceled_at = now(), next_action = NULL,
                version = version + 1, updated_at = now()
            WHERE id = p.id;
        ELSE
            o := attempt_open_charge(p.id);
            IF o.id IS NULL THEN
                RAISE WARNING 'payment %: % without an open charge; not expired', p.public_id,
                    p.status;
                UPDATE payment_intents SET expires_at = NULL WHERE id = p.id;
                CONTINUE;
            END IF;
            UPDATE payment_intents SET status = nxt, transition = 'expire', version = version + 1,
                updated_at = now()
            WHERE id = p.id RETURNING * INTO p;
            attempt_id := attempt_open(p, 'void', 0, o.id, 'expire', 'abandoned',
                                       o.gateway_provider, p_lease_ms);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
