// Drives paymentd with the official stripe Node library, pointed at the
// service (host, port, protocol). Exits non-zero on the first failed check.
'use strict';
const assert = require('assert');
const Stripe = require('stripe');

const stripe = new Stripe(process.env.PAYMENTD_KEY, {
  host: '127.0.0.1',
  port: Number(process.env.PAYMENTD_PORT),
  protocol: process.env.PAYMENTD_PROTOCOL || 'http',
  maxNetworkRetries: 1,
  telemetry: false,
});

async function main() {
  const created = await stripe.paymentIntents.create({
    amount: 2000,
    currency: 'usd',
    customer: 'cus_node',
    metadata: { order_id: 'node-1' },
  });
  assert.strictEqual(created.object, 'payment_intent');
  assert.strictEqual(created.status, 'requires_payment_method');
  assert.deepStrictEqual(created.metadata, { order_id: 'node-1' });

  const confirmed = await stripe.paymentIntents.confirm(created.id, {
    payment_method: 'pm_card_visa',
  });
  assert.strictEqual(confirmed.status, 'succeeded');
  assert.strictEqual(confirmed.amount_received, 2000);

  const retrieved = await stripe.paymentIntents.retrieve(created.id);
  assert.strictEqual(retrieved.id, created.id);
  assert.strictEqual(retrieved.status, 'succeeded');

  const toCancel = await stripe.paymentIntents.create({ amount: 500, currency: 'eur' });
  const canceled = await stripe.paymentIntents.cancel(toCancel.id, {
    cancellation_reason: 'requested_by_customer',
  });
  assert.strictEqual(canceled.status, 'canceled');

  const list = await stripe.paymentIntents.list({ limit: 2 });
  assert.strictEqual(list.object, 'list');
  assert.strictEqual(list.data.length, 2);
  assert.strictEqual(list.data[0].id, toCancel.id); // newest first
  let walked = 0;
  for await (const pi of stripe.paymentIntents.list({ limit: 1 })) {
    assert.ok(pi.id.startsWith('pi_'));
    walked += 1;
  }
  assert.strictEqual(walked, 2);

  let declined = null;
  try {
    await stripe.paymentIntents.create({
      amount: 700,
      currency: 'usd',
      payment_method: 'pm_card_chargeDeclined',
      confirm: true,
    });
  } catch (err) {
    declined = err;
  }
  assert.ok(declined instanceof Stripe.errors.StripeCardError, 'a decline raises StripeCardError');
  assert.strictEqual(declined.code, 'card_declined');
  assert.strictEqual(declined.decline_code, 'generic_decline');
  assert.strictEqual(declined.raw.payment_intent.status, 'requires_payment_method');

  let missing = null;
  try {
    await stripe.paymentIntents.retrieve('pi_doesnotexist');
  } catch (err) {
    missing = err;
  }
  assert.ok(missing instanceof Stripe.errors.StripeInvalidRequestError);
  assert.strictEqual(missing.statusCode, 404);
  console.log('stripe client: all checks passed');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
