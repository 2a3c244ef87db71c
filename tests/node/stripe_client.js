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
  // Refunds: two partial refunds, list, retrieve, the rest, then too much.
  const paid = await stripe.paymentIntents.create({
    amount: 3000, currency: 'usd', payment_method: 'pm_card_visa', confirm: true,
  });
  assert.strictEqual(paid.status, 'succeeded');
  const r1 = await stripe.refunds.create({ payment_intent: paid.id, amount: 1000 });
  assert.strictEqual(r1.object, 'refund');
  assert.strictEqual(r1.status, 'succeeded');
  assert.strictEqual(r1.charge, paid.latest_charge);
  const r2 = await stripe.refunds.create({
    charge: paid.latest_charge, amount: 500, reason: 'requested_by_customer', metadata: { n: '2' },
  });
  assert.strictEqual(r2.amount, 500);
  assert.deepStrictEqual(r2.metadata, { n: '2' });
  const refunds = await stripe.refunds.list({ payment_intent: paid.id });
  assert.deepStrictEqual(refunds.data.map((r) => r.id), [r2.id, r1.id]); // newest first
  const again = await stripe.refunds.retrieve(r1.id);
  assert.strictEqual(again.amount, 1000);
  const updated = await stripe.refunds.update(r1.id, { metadata: { note: 'x' } });
  assert.deepStrictEqual(updated.metadata, { note: 'x' });
  const rest = await stripe.refunds.create({ payment_intent: paid.id });
  assert.strictEqual(rest.amount, 1500); // what is left
  const charge = await stripe.charges.retrieve(paid.latest_charge);
  assert.strictEqual(charge.refunded, true);
  assert.strictEqual(charge.amount_refunded, 3000);
  assert.strictEqual(charge.refunds.data.length, 3);
  const charges = await stripe.charges.list({ payment_intent: paid.id });
  assert.deepStrictEqual(charges.data.map((c) => c.id), [paid.latest_charge]);
  let tooMuch = null;
  try {
    await stripe.refunds.create({ payment_intent: paid.id, amount: 1 });
  } catch (err) {
    tooMuch = err;
  }
  assert.ok(tooMuch instanceof Stripe.errors.StripeInvalidRequestError, 'refunding more raises');
  assert.strictEqual(tooMuch.code, 'charge_already_refunded');
  const other = await stripe.paymentIntents.create({
    amount: 800, currency: 'usd', payment_method: 'pm_card_visa', confirm: true,
  });
  let tooLarge = null;
  try {
    await stripe.refunds.create({ payment_intent: other.id, amount: 801 });
  } catch (err) {
    tooLarge = err;
  }
  assert.ok(tooLarge instanceof Stripe.errors.StripeInvalidRequestError);
  assert.strictEqual(tooLarge.code, 'amount_too_large');
  assert.strictEqual(tooLarge.param, 'amount');
  console.log('stripe client: all checks passed');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
