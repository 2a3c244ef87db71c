'use strict';
// A plain Node.js create+confirm payment service: the baseline paymentd's
// benchmark compares against. See README.md for the flow.
//
// Environment: PORT (required), HOST (127.0.0.1), PGHOST/PGPORT/PGUSER/
// PGDATABASE (read by pg), PG_POOL_SIZE (8 per process), REDIS_HOST
// (127.0.0.1), REDIS_PORT (6379), GATEWAY_URL, GATEWAY_KEY (optional bearer
// key for the gateway), NODEBENCH_WORKERS (2), LOG_LEVEL (warn).

const cluster = require('node:cluster');
const crypto = require('node:crypto');

const WORKERS = Number(process.env.NODEBENCH_WORKERS || 2);

if (cluster.isPrimary) {
  primary();
} else {
  worker().catch((err) => {
    console.error('nodebench worker failed to start:', err);
    process.exit(1);
  });
}

// The primary only forks the workers, replaces one that dies, and stops
// them on SIGTERM/SIGINT.
function primary() {
  if (!/^[0-9]+$/.test(process.env.PORT || '')) {
    console.error('nodebench: set PORT');
    process.exit(2);
  }
  let stopping = false;
  let alive = 0;
  let announced = false;
  const fork = () => {
    alive++;
    cluster.fork();
  };
  for (let i = 0; i < WORKERS; i++) fork();

  let listening = 0;
  cluster.on('listening', () => {
    if (++listening >= WORKERS && !announced) {
      announced = true;
      console.log(`nodebench: ${WORKERS} workers listening on port ${process.env.PORT}`);
    }
  });
  cluster.on('exit', (w, code, signal) => {
    alive--;
    if (stopping) {
      if (alive === 0) process.exit(0);
      return;
    }
    console.error(`nodebench: worker ${w.process.pid} exited (${signal || code}), starting another`);
    setTimeout(fork, 1000);
  });
  const stop = () => {
    if (stopping) return;
    stopping = true;
    if (alive === 0) process.exit(0);
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGTERM');
    setTimeout(() => process.exit(1), 10000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

class HttpError extends Error {
  constructor(statusCode, type, message, param) {
    super(message);
    this.statusCode = statusCode;
    this.type = type;
    this.param = param;
  }
}

const sha256hex = (s) => crypto.createHash('sha256').update(s).digest('hex');
const newId = (prefix) => `${prefix}_${crypto.randomBytes(12).toString('hex')}`;

const IDEM_TTL_MS = 86400000; // 24 h, as long as the keys are honoured
const KEY_CACHE_MS = 60000;
const GATEWAY_TIMEOUT_MS = 30000;
const INFLIGHT = 'inflight'; // the Redis value of a key claimed but not yet answered

async function worker() {
  const Fastify = require('fastify');
  const { Pool } = require('pg');
  const Redis = require('ioredis');

  const app = Fastify({
    logger: {
      level: process.env.LOG_LEVEL || 'warn',
      redact: ['req.headers.authorization'],
    },
  });
  await app.register(require('@fastify/formbody'));

  // PGHOST, PGPORT, PGUSER, PGDATABASE come from the environment.
  const pool = new Pool({ max: Number(process.env.PG_POOL_SIZE || 8) });
  pool.on('error', (err) => app.log.error({ err }, 'idle PostgreSQL client failed'));
  const redis = new Redis({
    host: process.env.REDIS_HOST || '127.0.0.1',
    port: Number(process.env.REDIS_PORT || 6379),
  });
  redis.on('error', (err) => app.log.error({ err }, 'redis'));

  const gatewayUrl = (process.env.GATEWAY_URL || 'http://127.0.0.1:12111').replace(/\/+$/, '');
  const gatewayHeaders = { 'Content-Type': 'application/json' };
  if (process.env.GATEWAY_KEY) gatewayHeaders.Authorization = `Bearer ${process.env.GATEWAY_KEY}`;

  // ---- authentication: API key hash -> account, cached 60 s per process ----

  const keyCache = new Map(); // key hash -> { accountId, expires }

  async function authenticate(req) {
    const header = req.headers.authorization;
    if (typeof header !== 'string' || !header.startsWith('Bearer ')) return null;
    const key = header.slice(7).trim();
    if (!key) return null;
    const hash = sha256hex(key);
    const now = Date.now();
    const hit = keyCache.get(hash);
    if (hit && hit.expires > now) return hit.accountId;
    const { rows } = await pool.query(
      'SELECT account_id FROM nodebench_api_keys WHERE key_hash = $1 AND revoked_at IS NULL',
      [hash],
    );
    if (rows.length === 0) {
      keyCache.delete(hash);
      return null;
    }
    keyCache.set(hash, { accountId: rows[0].account_id, expires: now + KEY_CACHE_MS });
    return rows[0].account_id;
  }

  // ---- parameters ----

  function parseParams(body) {
    if (!body || typeof body !== 'object') {
      throw new HttpError(400, 'invalid_request_error', 'Expected a form-encoded body');
    }
    const { amount, currency, payment_method: paymentMethod, confirm } = body;
    if (typeof amount !== 'string' || !/^[1-9][0-9]{0,7}$/.test(amount)) {
      throw new HttpError(400, 'invalid_request_error',
        'amount must be a positive integer in minor units, at most 99999999', 'amount');
    }
    if (typeof currency !== 'string' || !/^[a-zA-Z]{3}$/.test(currency)) {
      throw new HttpError(400, 'invalid_request_error',
        'currency must be a three-letter ISO code', 'currency');
    }
    if (typeof paymentMethod !== 'string' || !/^pm_[A-Za-z0-9_]{1,100}$/.test(paymentMethod)) {
      throw new HttpError(400, 'invalid_request_error',
        'payment_method must be a payment method id (pm_...)', 'payment_method');
    }
    if (confirm !== 'true') {
      throw new HttpError(400, 'invalid_request_error',
        'this service only creates and confirms in one call: confirm must be true', 'confirm');
    }
    return { amount: Number(amount), currency: currency.toLowerCase(), paymentMethod };
  }

  // ---- PostgreSQL ----

  // Runs fn(client) inside BEGIN ... COMMIT on one pooled connection.
  async function inTransaction(fn) {
    const client = await pool.connect();
    let broken;
    try {
      await client.query('BEGIN');
      const result = await fn(client);
      await client.query('COMMIT');
      return result;
    } catch (err) {
      try {
        await client.query('ROLLBACK');
      } catch (rollbackErr) {
        broken = rollbackErr; // the connection is unusable: let the pool drop it
      }
      throw err;
    } finally {
      client.release(broken);
    }
  }

  function intentJson(i) {
    return {
      id: i.id,
      object: 'payment_intent',
      amount: i.amount,
      amount_received: i.amount_received,
      currency: i.currency,
      payment_method: i.payment_method,
      status: i.status,
      latest_charge: i.latest_charge,
      created: i.created,
      livemode: false,
    };
  }

  // ---- the gateway ----

  async function gatewayCharge(intent) {
    let res;
    let text;
    try {
      res = await fetch(`${gatewayUrl}/v1/charges`, {
        method: 'POST',
        headers: { ...gatewayHeaders, 'Idempotency-Key': `${intent.id}:confirm:1` },
        body: JSON.stringify({
          amount: intent.amount,
          currency: intent.currency,
          payment_method: intent.payment_method,
          capture: true,
          metadata: { payment_intent: intent.id },
        }),
        signal: AbortSignal.timeout(GATEWAY_TIMEOUT_MS),
      });
      text = await res.text();
    } catch (err) {
      app.log.warn({ err, intent: intent.id }, 'gateway unreachable');
      throw new HttpError(502, 'api_error', 'The payment gateway could not be reached');
    }
    let charge = null;
    try {
      charge = JSON.parse(text);
    } catch {
      // handled below
    }
    if (res.status !== 200 || !charge || typeof charge.id !== 'string') {
      app.log.warn({ status: res.status, intent: intent.id }, 'gateway refused the charge');
      throw new HttpError(502, 'api_error', `The payment gateway answered ${res.status}`);
    }
    return charge;
  }

  // ---- the flow ----

  // Creates the intent (transaction 1), charges it, records the outcome
  // (transaction 2). Returns the answer { code, hash, body } to send and to
  // keep for replays (with replayed: true when the database already had it).
  async function createAndConfirm(accountId, idemKey, hash, p) {
    let intent = {
      id: newId('pi'),
      amount: p.amount,
      amount_received: 0,
      currency: p.currency,
      payment_method: p.paymentMethod,
      status: 'processing',
      latest_charge: null,
      created: Math.floor(Date.now() / 1000),
    };

    const fresh = await inTransaction(async (c) => {
      const claim = await c.query(
        `INSERT INTO nodebench_idempotency (account_id, idem_key, request_hash, intent_id)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING`,
        [accountId, idemKey, hash, intent.id],
      );
      if (claim.rowCount === 0) return false;
      await c.query(
        `INSERT INTO nodebench_intents
           (id, account_id, amount, currency, payment_method, status, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, 'processing', to_timestamp($6), now())`,
        [intent.id, accountId, intent.amount, intent.currency, intent.payment_method, intent.created],
      );
      await c.query(
        `INSERT INTO nodebench_outbox (event_type, aggregate_id, payload)
         VALUES ('payment_intent.processing', $1, $2::jsonb)`,
        [intent.id, JSON.stringify(intentJson(intent))],
      );
      return true;
    });

    if (!fresh) {
      // The key was used before, yet Redis did not hold it: an earlier
      // attempt failed after its first transaction (its claim was released),
      // or Redis lost the key. The database row decides.
      const { rows } = await pool.query(
        `SELECT k.request_hash, k.response_code, k.response_body,
                i.id, i.amount, i.amount_received, i.currency, i.payment_method, i.status,
                i.latest_charge, extract(epoch FROM i.created_at)::bigint AS created
           FROM nodebench_idempotency k JOIN nodebench_intents i ON i.id = k.intent_id
          WHERE k.account_id = $1 AND k.idem_key = $2`,
        [accountId, idemKey],
      );
      const prior = rows[0];
      if (!prior) throw new Error('idempotency row without its intent');
      if (prior.request_hash !== hash) throw idempotencyMismatch();
      if (prior.response_code !== null) {
        return { code: prior.response_code, hash, body: prior.response_body, replayed: true };
      }
      if (prior.status !== 'processing') throw new Error(`unanswered key on a ${prior.status} intent`);
      // Resume: the gateway's own Idempotency-Key makes the charge happen once.
      intent = {
        id: prior.id,
        amount: Number(prior.amount),
        amount_received: Number(prior.amount_received),
        currency: prior.currency,
        payment_method: prior.payment_method,
        status: prior.status,
        latest_charge: prior.latest_charge,
        created: Number(prior.created),
      };
    }

    const charge = await gatewayCharge(intent);

    if (charge.status === 'succeeded') {
      intent.status = 'succeeded';
      intent.amount_received = intent.amount;
      intent.latest_charge = charge.id;
      const body = JSON.stringify(intentJson(intent));
      await inTransaction(async (c) => {
        const upd = await c.query(
          `UPDATE nodebench_intents
              SET status = 'succeeded', amount_received = $2, latest_charge = $3, updated_at = now()
            WHERE id = $1 AND status = 'processing'`,
          [intent.id, intent.amount_received, charge.id],
        );
        if (upd.rowCount !== 1) throw new Error(`intent ${intent.id} is no longer processing`);
        await c.query(
          `INSERT INTO nodebench_transactions
             (id, intent_id, account_id, type, amount, currency, gateway_charge_id)
           VALUES ($1, $2, $3, 'charge', $4, $5, $6)`,
          [newId('txn'), intent.id, accountId, intent.amount, intent.currency, charge.id],
        );
        await c.query(
          `INSERT INTO nodebench_outbox (event_type, aggregate_id, payload)
           VALUES ('payment_intent.succeeded', $1, $2::jsonb)`,
          [intent.id, body],
        );
        await c.query(
          `UPDATE nodebench_idempotency
              SET response_code = 200, response_body = $3, completed_at = now()
            WHERE account_id = $1 AND idem_key = $2`,
          [accountId, idemKey, body],
        );
      });
      return { code: 200, hash, body };
    }

    if (charge.status === 'failed') {
      // A decline is an answer too: the intent goes back to
      // requires_payment_method and the 402 is kept for replays.
      const lastError = {
        type: 'card_error',
        code: charge.failure_code || 'card_declined',
        decline_code: charge.decline_code,
        message: charge.failure_message || 'Your card was declined.',
        charge: charge.id,
      };
      intent.status = 'requires_payment_method';
      intent.latest_charge = charge.id;
      const intentBody = JSON.stringify(intentJson(intent));
      const body = JSON.stringify({ error: { ...lastError, payment_intent: intentJson(intent) } });
      await inTransaction(async (c) => {
        const upd = await c.query(
          `UPDATE nodebench_intents
              SET status = 'requires_payment_method', latest_charge = $2,
                  last_payment_error = $3::jsonb, updated_at = now()
            WHERE id = $1 AND status = 'processing'`,
          [intent.id, charge.id, JSON.stringify(lastError)],
        );
        if (upd.rowCount !== 1) throw new Error(`intent ${intent.id} is no longer processing`);
        await c.query(
          `INSERT INTO nodebench_outbox (event_type, aggregate_id, payload)
           VALUES ('payment_intent.payment_failed', $1, $2::jsonb)`,
          [intent.id, intentBody],
        );
        await c.query(
          `UPDATE nodebench_idempotency
              SET response_code = 402, response_body = $3, completed_at = now()
            WHERE account_id = $1 AND idem_key = $2`,
          [accountId, idemKey, body],
        );
      });
      return { code: 402, hash, body };
    }

    // requires_action (3-D Secure) and the like are outside this baseline.
    throw new HttpError(502, 'api_error', `Unexpected charge status ${charge.status}`);
  }

  function idempotencyMismatch() {
    return new HttpError(400, 'idempotency_error',
      'Keys for idempotent requests can only be used with the same parameters they were first used with.');
  }

  function sendAnswer(reply, answer, replayed) {
    if (replayed) reply.header('Idempotent-Replayed', 'true');
    return reply.code(answer.code).type('application/json; charset=utf-8').send(answer.body);
  }

  // ---- routes ----

  app.get('/healthz', async () => ({ status: 'ok' }));

  app.post('/v1/payment_intents', async (req, reply) => {
    const accountId = await authenticate(req);
    if (!accountId) {
      throw new HttpError(401, 'invalid_request_error', 'Invalid API key provided');
    }
    const idemKey = req.headers['idempotency-key'];
    if (typeof idemKey !== 'string' || idemKey.length === 0 || idemKey.length > 255) {
      throw new HttpError(400, 'invalid_request_error',
        'an Idempotency-Key header of 1 to 255 characters is required');
    }
    const p = parseParams(req.body);
    const hash = sha256hex(`${p.amount}\n${p.currency}\n${p.paymentMethod}\nconfirm=true`);
    const rkey = `nodebench:idem:${accountId}:${idemKey}`;

    const claimed = await redis.set(rkey, INFLIGHT, 'PX', IDEM_TTL_MS, 'NX');
    if (claimed !== 'OK') {
      const stored = await redis.get(rkey);
      if (stored && stored !== INFLIGHT) {
        const answer = JSON.parse(stored);
        if (answer.hash !== hash) throw idempotencyMismatch();
        return sendAnswer(reply, answer, true);
      }
      throw new HttpError(409, 'idempotency_error',
        'A request with this Idempotency-Key is still being processed');
    }

    let answer;
    try {
      answer = await createAndConfirm(accountId, idemKey, hash, p);
    } catch (err) {
      // Release the claim so that a retry with the same key can go on; the
      // database row makes it resume rather than pay twice.
      await redis.del(rkey).catch((e) => req.log.error({ err: e }, 'releasing idempotency claim'));
      throw err;
    }
    try {
      const { code, body } = answer;
      await redis.set(rkey, JSON.stringify({ code, hash, body }), 'PX', IDEM_TTL_MS);
    } catch (err) {
      req.log.error({ err }, 'storing the answer in Redis');
      await redis.del(rkey).catch(() => {}); // the database row still answers replays
    }
    return sendAnswer(reply, answer, answer.replayed === true);
  });

  app.setErrorHandler((err, req, reply) => {
    if (err instanceof HttpError) {
      const error = { type: err.type, message: err.message };
      if (err.param) error.param = err.param;
      return reply.code(err.statusCode).send({ error });
    }
    if (err.statusCode && err.statusCode < 500) {
      // fastify's own: unparsable body, unsupported content type, too large
      return reply.code(err.statusCode).send({
        error: { type: 'invalid_request_error', message: err.message },
      });
    }
    req.log.error({ err }, 'request failed');
    return reply.code(500).send({ error: { type: 'api_error', message: 'Internal error' } });
  });

  const shutdown = async () => {
    try {
      await app.close();
      await pool.end();
      redis.disconnect();
    } finally {
      process.exit(0);
    }
  };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);
  process.once('disconnect', shutdown); // the primary went away

  await app.listen({ port: Number(process.env.PORT), host: process.env.HOST || '127.0.0.1' });
}
