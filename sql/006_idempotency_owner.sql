-- Who holds an idempotency key's claim ("host/instance/pid/started_ms"), so
-- that a claim whose api process has died can be taken over at once on the
-- same host instead of after the lock period.
ALTER TABLE idempotency_keys ADD COLUMN locked_by text;
