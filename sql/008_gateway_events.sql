-- Inbound gateway callbacks already applied, by the gateway's event id: a
-- repeat changes nothing. Written in the transaction that applies it.
CREATE TABLE gateway_events (
    provider     text NOT NULL,
    event_id     text NOT NULL CHECK (length(event_id) BETWEEN 1 AND 255),
    type         text NOT NULL,
    payment_intent_id bigint REFERENCES payment_intents (id),
    applied      boolean NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);
CREATE INDEX payment_intents_latest_charge ON payment_intents (latest_charge)
    WHERE latest_charge IS NOT NULL;
