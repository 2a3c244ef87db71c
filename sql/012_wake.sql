-- The outbox dispatcher is woken by the writers over NNG after their commit
-- (common/wake.c) and by its own poll; a NOTIFY in every event's
-- transaction made those commits queue on PostgreSQL's notification lock.
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();
