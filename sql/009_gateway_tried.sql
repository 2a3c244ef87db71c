-- With several gateway providers, the providers a payment's current attempt
-- (its version) was sent to, recorded before each first call: a payment
-- may move to the next provider only when the one it leaves was never
-- possibly reached with this attempt's key.
ALTER TABLE payment_intents ADD COLUMN gateway_tried text[] NOT NULL DEFAULT '{}';
ALTER TABLE payment_intents ADD COLUMN gateway_tried_version bigint;
