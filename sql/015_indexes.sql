-- Only the indexes a query uses: every insert and every non-HOT update
-- writes each of a table's indexes. Checked with EXPLAIN against a table
-- of 100,000 rows; what served the queries below is kept:
--   outbox claim (outbox/outbox.c): outbox_unsent for the oldest unsent
--     events and outbox_pending_aggregate for "no earlier unsent event of
--     the same payment", probed once per candidate; without it the planner
--     hashes every unsent row on each claim, a cost that grows with the
--     backlog (and so makes it grow: a dispatcher 60 s behind after a
--     minute at saturation, in bench). outbox_pending (available_at, id)
--     served nothing;
--   payment_intents.gateway_intent_id is no longer written or read: its
--     unique index held one NULL entry per payment;
--   payment_transactions: lookups by the gateway's charge id, with or
--     without the provider, use payment_transactions_charge (a charge id
--     names one provider's charge; the provider is checked on the row), and
--     nothing reads processed_at or reconciled.
DROP INDEX IF EXISTS outbox_pending;
ALTER TABLE payment_intents DROP CONSTRAINT IF EXISTS payment_intents_gateway_intent_id_key;
DROP INDEX IF EXISTS payment_transactions_gateway;
DROP INDEX IF EXISTS payment_transactions_unreconciled;
