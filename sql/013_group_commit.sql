-- Group commit: the runs of one statement that wait together for a
-- connection share one transaction (common/pgev.c, pgev_exec_batched).
-- Each run is its own savepoint (a BEGIN ... EXCEPTION block), so one that
-- fails leaves the others' work and answers intact; it comes back as
-- "SQLSTATE XXXXX: message" in the second column. $1 is a JSON array of
-- each run's parameters as text, in the single statement's order.

-- pi_create as the api runs it (api/intents.c), with its attempt's job.
CREATE FUNCTION pi_create_batch(p_runs jsonb)
RETURNS TABLE (n integer, pgev_error text, object text, status text, public_id text,
    idem_row bigint, attempt_id bigint, key text, type text, purpose text, intent_id bigint,
    account_id bigint, amount bigint, currency text, payment_method text, provider text,
    target text, target_key text)
LANGUAGE plpgsql AS $$
DECLARE
    e jsonb;
    i integer := 0;
    r record;
    j attempt_jobs;
BEGIN
    -- A run waiting on a lock would hold every other run's commit: after
    -- a second it fails (55P03) and pgev runs it again alone, without this
    -- limit. A deadlock between two batches (40P01) goes the same way.
    PERFORM set_config('lock_timeout', '1000', true);
    FOR e IN SELECT value FROM jsonb_array_elements(p_runs) LOOP
        i := i + 1;
        BEGIN
            SELECT * INTO r FROM pi_create(e ->> 0, (e ->> 1)::bigint, (e ->> 2)::bigint, e ->> 3,
                e ->> 4, e ->> 5, (e ->> 6)::jsonb, e ->> 7, e ->> 8, (e ->> 9)::boolean, e ->> 10,
                e ->> 11, (e ->> 12)::bigint, e ->> 13, (e ->> 14)::bigint, (e ->> 15)::jsonb);
            j := NULL;
            SELECT * INTO j FROM attempt_job(r.attempt_id);
            RETURN QUERY SELECT i, NULL::text, r.object, r.status, r.public_id, r.idem_row,
                j.attempt_id, j.key, j.type, j.purpose, j.intent_id, j.account_id, j.amount,
                j.currency, j.payment_method, j.provider, j.target, j.target_key;
        EXCEPTION WHEN OTHERS THEN
            RETURN QUERY SELECT i, 'SQLSTATE ' || SQLSTATE || ': ' || SQLERRM, NULL::text,
                NULL::text, NULL::text, NULL::bigint, NULL::bigint, NULL::text, NULL::text,
                NULL::text, NULL::bigint, NULL::bigint, NULL::bigint, NULL::text, NULL::text,
                NULL::text, NULL::text, NULL::text;
        END;
    END LOOP;
END
$$;

-- attempt_apply as the worker runs it (worker/worker.c), with the next
-- attempt's job.
CREATE FUNCTION attempt_apply_batch(p_runs jsonb)
RETURNS TABLE (n integer, pgev_error text, applied boolean, object text, status text,
    next_attempt bigint, age_us bigint, received bigint, answer_code integer, answer_body text,
    attempt_id bigint, key text, type text, purpose text, intent_id bigint, public_id text,
    account_id bigint, amount bigint, currency text, payment_method text, provider text,
    target text, target_key text)
LANGUAGE plpgsql AS $$
DECLARE
    e jsonb;
    i integer := 0;
    r record;
    j attempt_jobs;
BEGIN
    -- A run waiting on a lock would hold every other run's commit: after
    -- a second it fails (55P03) and pgev runs it again alone, without this
    -- limit. A deadlock between two batches (40P01) goes the same way.
    PERFORM set_config('lock_timeout', '1000', true);
    FOR e IN SELECT value FROM jsonb_array_elements(p_runs) LOOP
        i := i + 1;
        BEGIN
            SELECT * INTO r FROM attempt_apply((e ->> 0)::bigint, e ->> 1, e ->> 2,
                (e ->> 3)::bigint, e ->> 4, e ->> 5, e ->> 6, e ->> 7, (e ->> 8)::bigint,
                (e ->> 9)::bigint, e ->> 10, e ->> 11);
            j := NULL;
            SELECT * INTO j FROM attempt_job(r.next_attempt);
            RETURN QUERY SELECT i, NULL::text, r.applied, r.object, r.status, r.next_attempt,
                r.age_us, r.received, r.answer_code, r.answer_body, j.attempt_id, j.key, j.type,
                j.purpose, j.intent_id, j.public_id, j.account_id, j.amount, j.currency,
                j.payment_method, j.provider, j.target, j.target_key;
        EXCEPTION WHEN OTHERS THEN
            RETURN QUERY SELECT i, 'SQLSTATE ' || SQLSTATE || ': ' || SQLERRM, NULL::boolean,
                NULL::text, NULL::text, NULL::bigint, NULL::bigint, NULL::bigint, NULL::integer,
                NULL::text, NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::bigint,
                NULL::text, NULL::bigint, NULL::bigint, NULL::text, NULL::text, NULL::text,
                NULL::text, NULL::text;
        END;
    END LOOP;
END
$$;
