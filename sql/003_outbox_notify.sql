-- Wakes the outbox dispatchers when events are written (once per statement;
-- the dispatcher also polls, so a lost notification only delays).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Dispatchers look for the oldest pending events in id order, and for
-- earlier pending events of the same payment; both indexes stay as small as
-- the backlog, however long the table grows.
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
CREATE INDEX outbox_pending_aggregate ON outbox (aggregate_id, id) WHERE sent_at IS NULL;
