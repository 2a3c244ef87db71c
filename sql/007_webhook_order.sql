-- Deliveries to one endpoint go out in event order per payment (per
-- aggregate): a delivery waits while an earlier one of the same aggregate
-- to the same endpoint is still pending or failing. The aggregate is kept
-- on the delivery so that check is one index probe.
ALTER TABLE webhook_deliveries ADD COLUMN aggregate_id text;
UPDATE webhook_deliveries d SET aggregate_id = o.aggregate_id FROM outbox o WHERE o.id = d.outbox_id;
CREATE INDEX webhook_deliveries_aggregate ON webhook_deliveries (endpoint_id, aggregate_id, outbox_id)
    WHERE status IN ('pending', 'failed');
