-- Variant for the bench's schema A/B: a NOTIFY in every event's
-- transaction, as before sql/012_wake.sql (PostgreSQL holds a database-wide
-- lock from PreCommit_Notify to the end of the commit).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
