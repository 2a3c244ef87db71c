-- The events API lists an account's outbox rows newest first, optionally by type.
CREATE INDEX outbox_account_id ON outbox (account_id, id DESC);
CREATE INDEX outbox_account_type ON outbox (account_id, type, id DESC);
