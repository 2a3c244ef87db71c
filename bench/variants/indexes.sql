-- Variant for the bench's schema A/B: the indexes this pass dropped
-- (sql/010_attempts.sql, sql/015_indexes.sql), and payment_intents without
-- room for HOT updates.
CREATE INDEX payment_intents_latest_charge ON payment_intents (latest_charge)
    WHERE latest_charge IS NOT NULL;
ALTER TABLE payment_intents ADD CONSTRAINT payment_intents_gateway_intent_id_key
    UNIQUE (gateway_intent_id);
ALTER TABLE payment_intents SET (fillfactor = 100);
CREATE INDEX outbox_pending ON outbox (available_at, id) WHERE sent_at IS NULL;
CREATE INDEX payment_transactions_gateway
    ON payment_transactions (gateway_provider, gateway_transaction_id);
CREATE INDEX payment_transactions_unreconciled ON payment_transactions (processed_at)
    WHERE NOT reconciled;
