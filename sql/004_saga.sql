-- The order saga's outcome messages (PaymentCompleted / PaymentFailed, the
-- fields of the saga's event schema), written to the outbox by the worker
-- in the transaction that records the payment's outcome. They follow the
-- payment's own events (same aggregate id), so they go out after them.
CREATE FUNCTION saga_outcome_event(p payment_intents, p_transaction text, p_reason text)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO outbox (event_id, account_id, aggregate_type, aggregate_id, type, payload)
    SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), p.account_id, 'order',
           p.public_id,
           CASE WHEN p.status = 'succeeded' THEN 'PaymentCompleted' ELSE 'PaymentFailed' END,
           CASE WHEN p.status = 'succeeded' THEN
               jsonb_build_object('orderId', p.order_id, 'paymentId', p.public_id,
                                  'transactionId', p_transaction, 'amount', p.amount_received,
                                  'currency', p.currency,
                                  'timestamp', to_char(now() AT TIME ZONE 'UTC',
                                                       'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
           ELSE
               jsonb_build_object('orderId', p.order_id, 'paymentId', p.public_id,
                                  'reason', coalesce(p_reason, p.status),
                                  'timestamp', to_char(now() AT TIME ZONE 'UTC',
                                                       'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
           END
$$;
