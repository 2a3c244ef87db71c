#!/usr/bin/env python3
"""The chaos suite: payments under load while processes, the gateway, Redis
and PostgreSQL fail, then a check that nothing was lost, charged twice,
left stuck or left unannounced.

A load generator sends at least FLOWS create+confirm pairs with unique
idempotency keys, retrying each failed or timed-out request with the same
key as a real client does, and, on threads of their own, refunds the
payment of one flow in five once it succeeded (in full, a third, or a third
and then the rest; by payment or by charge id) the same way, while a fault
script, in one run, kills a random
worker every few seconds, kills an api process and the outbox once each,
makes gatewaysim time out after taking the charge on a share of calls and
refuse connections for 10 s, restarts Redis, and restarts PostgreSQL (fast
shutdown). Within SETTLE_S after the faults stop it checks and prints:

- every request that got a 2xx exists in PostgreSQL with that response's
  status or a later one (lost);
- every payment is succeeded, requires_payment_method, requires_action or
  canceled (stuck);
- gatewaysim's ledger holds at most one charge per payment and the charged
  payments are exactly the succeeded ones (double-charged, charge mismatch);
- every state change has exactly one outbox event, and every event reached
  the NNG subscriber and the webhook endpoint, in order per payment (events
  missing, out of order);
- every refund that got a 2xx exists in PostgreSQL, and one answered
  succeeded or failed ended so (refunds lost); no payment has more refunded
  at the gateways than its succeeded refunds in PostgreSQL (refunds doubled),
  nor less, and amount_refunded agrees with both; no refund is pending
  anywhere (refunds stuck); nothing is refunded above what was captured; each
  refund has one refund.created and one final event, and each succeeded one
  a charge.refunded;
- /healthz answered throughout; the share of creates answered within 1 s.

Exit status 0 only when every count that must be zero is zero. Run by
./scripts/test through ctest; runs alone with the same environment as the
integration tests (PAYMENTD_BIN, POSTGRES_HOST).
"""
import collections
import heapq
import http.client
import http.server
import itertools
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from harness import BIN, SOURCE, Gateway, Paymentd, free_port, wait_for  # noqa: E402

FLOWS = int(os.environ.get("CHAOS_FLOWS", "2000"))
# 2: a second gateway provider behind the first; the faults hit the first,
# so payments fail over while workers die, and the two ledgers together must
# still hold one charge per succeeded payment.
PROVIDERS = int(os.environ.get("CHAOS_PROVIDERS", "1"))
CLIENTS = int(os.environ.get("CHAOS_CLIENTS", "16"))
FAULT_SECONDS = 36
SETTLE_S = 60
FINAL = {"succeeded", "requires_payment_method", "requires_action", "canceled"}
# What a status may become later: a 2xx status is "not lost" when the row
# holds it or one of these.
LATER = {
    "requires_payment_method": {"requires_payment_method", "requires_confirmation", "processing",
                                "succeeded", "requires_action", "requires_capture", "canceled"},
    "requires_confirmation": {"requires_confirmation", "processing", "succeeded",
                              "requires_payment_method", "requires_action", "requires_capture",
                              "canceled"},
    "processing": {"processing", "succeeded", "requires_payment_method", "requires_action",
                   "requires_capture", "canceled"},
    "requires_action": {"requires_action", "processing", "succeeded", "requires_payment_method",
                        "canceled"},
    "succeeded": {"succeeded"},
    "canceled": {"canceled"},
}
# The share of flows whose payment, once succeeded, is refunded (i % 5 == 1:
# never a declined or 3-D Secure flow), and how: in full, a third, or a
# third and then the rest.
REFUND_EVERY, REFUND_SLOT, REFUND_CLIENTS = 5, 1, 4
REFUND_WAIT_S = 45  # how long a refund waits for its payment to stop processing
REFUND_FINAL = {"succeeded", "failed", "canceled"}
REFUND_FINAL_EVENT = {"succeeded": "refund.updated", "canceled": "refund.updated", "failed": "refund.failed"}
FINAL_EVENT = {"succeeded": "payment_intent.succeeded",
               "requires_payment_method": "payment_intent.payment_failed",
               "requires_action": "payment_intent.requires_action",
               "canceled": "payment_intent.canceled"}


def log(msg):
    print("[chaos %6.1fs] %s" % (time.monotonic() - T0, msg), flush=True)


T0 = time.monotonic()


def lib(script, timeout=120):
    r = subprocess.run(["bash", "-c", "source %s/scripts/lib.sh; %s" % (SOURCE, script)],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError("%s: %s %s" % (script, r.stdout, r.stderr))


class Servers:
    """A private PostgreSQL and Redis that the fault script may restart."""

    def __init__(self, base):
        self.dir = tempfile.mkdtemp(prefix="chaos-", dir=base)
        os.chmod(self.dir, 0o755)
        self.pg_data = os.path.join(self.dir, "pg")
        self.redis_dir = os.path.join(self.dir, "redis")
        self.pg_port, self.redis_port = free_port(), free_port()
        lib("pg_start %s %d && pg_ensure_db %d" % (self.pg_data, self.pg_port, self.pg_port))
        lib("redis_start %s %d no" % (self.redis_dir, self.redis_port))

    def sql(self, query):
        r = subprocess.run(["psql", "-h", os.environ.get("POSTGRES_HOST", "127.0.0.1"), "-p", str(self.pg_port),
                            "-U", "paymentd", "-d", "paymentd", "-X", "-A", "-t", "-F", "\t", "-c", query],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError("psql: " + r.stderr)
        return [line.split("\t") for line in r.stdout.splitlines() if line]

    def restart_redis(self):
        lib("redis_stop %s" % self.redis_dir)
        time.sleep(1)
        lib("redis_start %s %d no" % (self.redis_dir, self.redis_port))

    def restart_postgres(self):
        lib("pg_stop %s fast && pg_start %s %d" % (self.pg_data, self.pg_data, self.pg_port))

    def close(self):
        for script in ("redis_stop %s" % self.redis_dir, "pg_stop %s immediate" % self.pg_data):
            try:
                lib(script)
            except Exception as e:  # keep tearing down
                print("teardown:", e)
        shutil.rmtree(self.dir, True)


class Webhooks:
    """The merchant's endpoint: records each delivery's event id in arrival order."""

    def __init__(self):
        self.port = free_port()
        self.events = []  # (event id, payment id)
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.events.append((body["id"], body["data"]["object"].get("id")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Subscriber:
    """paymentctl subscribe: every event published on NNG, in arrival order."""

    def __init__(self, pd):
        env = {k: v for k, v in pd.env.items() if k != "RUN_DIR"}
        self.proc = subprocess.Popen([os.path.join(BIN, "paymentctl"), "--run-dir", pd.run_dir, "subscribe", "all"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.events = []  # (event id, payment id)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            e = json.loads(line)
            self.events.append((e["event_id"], e["event"]["data"]["object"].get("id")))

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


class Load:
    """Create+confirm flows from CLIENTS threads; every request retried with
    its key until it gets a definite answer."""

    def __init__(self, port, key, run):
        self.port, self.key, self.run = port, key, run
        self.next = 0
        self.lock = threading.Lock()
        self.ok = []              # (payment id, status) of every 2xx
        self.refunds_ok = []      # (refund id, payment id, amount, status) of every 2xx to a refund
        self.refund_flows = 0
        self.refund_skipped = collections.Counter()  # flows of the refund slot not refunded, by status
        self.confirmed = collections.Counter()       # the refund slot's confirm answers, by status
        # Refunds run on threads of their own from a queue ordered by when
        # each is due, so that a payment still processing (asked again
        # every second) holds no thread.
        self.refunds = []  # heap of (due, seq, flow number, the payment as last seen, give up at)
        self.refunds_cv = threading.Condition()
        self.refunds_seq = itertools.count()
        self.load_done = False
        self.refunders = [threading.Thread(target=self._refunder, daemon=True) for _ in range(REFUND_CLIENTS)]
        self.create_latency = []  # seconds to the first answer of each create attempt
        self.unexpected = []      # definite 4xx that a correct service never gives here
        self.gave_up = 0
        self.errors = []          # 500 answers and flows given up, for the report
        self.slow = []            # the first few requests answered after more than 10 s
        self.requests = collections.Counter()
        self.keep_going = True
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def start(self):
        for t in self.threads + self.refunders:
            t.start()

    def join(self):
        for t in self.threads:
            t.join()
        with self.refunds_cv:
            self.load_done = True
            self.refunds_cv.notify_all()
        for t in self.refunders:
            t.join()

    def _call(self, path, params, idem):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request("POST", path, urllib.parse.urlencode(params),
                         {"Authorization": "Bearer " + self.key, "Idempotency-Key": idem,
                          "Content-Type": "application/x-www-form-urlencoded"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def _until_answered(self, path, params, idem, timed=False):
        started = deadline = time.monotonic()
        deadline += 180
        delay = 0.1
        last = None
        history = []
        while time.monotonic() < deadline:
            t = time.monotonic()
            try:
                code, body = self._call(path, params, idem)
                self.requests[code] += 1
            except (OSError, http.client.HTTPException):
                code, body = None, b""
                self.requests["connection error"] += 1
            history.append((round(time.monotonic() - started, 1), code))
            if time.monotonic() - started > 10 and len(self.slow) < 5 and (code and 200 <= code < 300):
                with self.lock:
                    self.slow.append((path, idem, history))
            if timed:
                with self.lock:
                    self.create_latency.append(time.monotonic() - t if code and code < 500 else None)
            if code and 200 <= code < 300:
                obj = json.loads(body)
                with self.lock:
                    if obj.get("object") == "refund":
                        self.refunds_ok.append((obj["id"], obj.get("payment_intent"), obj.get("amount"),
                                                obj["status"]))
                    else:
                        self.ok.append((obj["id"], obj["status"]))
                return obj
            if code == 402:  # a decline: a definite answer, the payment is in the error
                obj = json.loads(body)["error"]["payment_intent"]
                with self.lock:
                    self.ok.append((obj["id"], obj["status"]))
                return obj
            if code in (400, 401, 404):
                with self.lock:
                    self.unexpected.append((path, code, body[:300]))
                return None
            last = (code, body[:200])
            if code == 500:
                with self.lock:
                    self.errors.append((path, idem, body[:300]))
            time.sleep(delay + random.random() * delay)  # 409, 429, 5xx, no answer: same key again
            delay = min(delay * 2, 2.0)
        with self.lock:
            self.gave_up += 1
            self.errors.append(("gave up", path, idem, last))
        return None

    def _client(self):
        while True:
            with self.lock:
                i = self.next
                if i >= FLOWS and not self.keep_going:
                    return
                self.next += 1
            pm = ("pm_card_chargeDeclined" if i % 20 == 7 else
                  "pm_card_authenticationRequired" if i % 20 == 13 else "pm_card_visa")
            pi = self._until_answered("/v1/payment_intents",
                                      {"amount": 1000 + i, "currency": "usd", "payment_method": pm},
                                      "%s-%d-create" % (self.run, i), timed=True)
            if pi:
                paid = self._until_answered("/v1/payment_intents/%s/confirm" % pi["id"], {},
                                            "%s-%d-confirm" % (self.run, i))
                if paid and i % REFUND_EVERY == REFUND_SLOT:
                    with self.lock:
                        self.confirmed[paid.get("status")] += 1
                    self._refund_later(0, i, paid, time.monotonic() + REFUND_WAIT_S)

    def _refund_later(self, delay, i, paid, give_up):
        with self.refunds_cv:
            heapq.heappush(self.refunds, (time.monotonic() + delay, next(self.refunds_seq), i, paid, give_up))
            self.refunds_cv.notify()

    def _refunder(self):
        while True:
            with self.refunds_cv:
                while True:
                    now = time.monotonic()
                    if self.refunds and self.refunds[0][0] <= now:
                        _, _, i, paid, give_up = heapq.heappop(self.refunds)
                        break
                    if not self.refunds and self.load_done:
                        return
                    self.refunds_cv.wait(min(0.5, self.refunds[0][0] - now) if self.refunds else 0.5)
            if paid.get("status") == "processing":  # the outcome came after CONFIRM_WAIT_MS
                now = self._get(paid["id"]) or paid
                if now.get("status") == "processing" and time.monotonic() < give_up:
                    self._refund_later(1.0, i, now, give_up)
                    continue
                paid = now
            if paid.get("status") == "succeeded":
                self._refund(i, paid)
            else:
                with self.lock:
                    self.refund_skipped[paid.get("status")] += 1

    def _get(self, pid):
        """The payment now, or None."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request("GET", "/v1/payment_intents/" + pid, headers={"Authorization": "Bearer " + self.key})
            r = conn.getresponse()
            code, body = r.status, r.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
        return json.loads(body) if code == 200 else None

    def _refund(self, i, pi):
        """In full, a third, or a third and then the rest; by payment or,
        every other one, by its charge; each with its own key, retried."""
        with self.lock:
            self.refund_flows += 1
        third = max(1, pi["amount"] // 3)
        plan = [[None], [third], [third, None]][(i // REFUND_EVERY) % 3]
        for n, amount in enumerate(plan):
            params = {"payment_intent": pi["id"]}
            if (i // REFUND_EVERY) % 2 and pi.get("latest_charge"):
                params = {"charge": pi["latest_charge"]}
            if amount:
                params["amount"] = amount
            if n == 0 and i % 3 == 0:
                params["reason"] = "requested_by_customer"
            if not self._until_answered("/v1/refunds", params, "%s-%d-refund-%d" % (self.run, i, n)):
                return


class Prober:
    """GET /healthz every 100 ms; the longest stretch without an answer."""

    def __init__(self, port):
        self.port, self.ok, self.failed = port, 0, 0
        self.longest_gap, self.running = 0.0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        last_ok = time.monotonic()
        while self.running:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/healthz")
                good = conn.getresponse().status == 200
                conn.close()
            except (OSError, http.client.HTTPException):
                good = False
            now = time.monotonic()
            if good:
                self.ok += 1
                self.longest_gap = max(self.longest_gap, now - last_ok)
                last_ok = now
            else:
                self.failed += 1
            time.sleep(0.1)

    def stop(self):
        self.running = False
        self.thread.join()


def faults(pd, gw, servers, done):
    """The fault script; each line of its log says what it did and when."""
    rng = random.Random(os.environ.get("CHAOS_SEED"))
    start = time.monotonic()
    plan = [(1, "gateway times out after taking the charge on 5% of calls"),
            (5, "kill -9 an api process"), (9, "kill -9 the outbox"),
            (13, "gateway refuses connections for 10 s"), (17, "restart Redis"),
            (26, "restart PostgreSQL (fast shutdown)"), (FAULT_SECONDS - 2, "gateway timeouts off")]
    next_worker_kill = 2.0
    kills = 0
    while time.monotonic() - start < FAULT_SECONDS:
        t = time.monotonic() - start
        if plan and t >= plan[0][0]:
            _, what = plan.pop(0)
            log("fault: " + what)
            if what.startswith("gateway times out"):
                gw.configure(timeout_rate=5)
            elif what.startswith("kill -9 an api"):
                victim = rng.choice([r for r in pd.status() if r["role"] == "api" and r["pid"]])
                os.kill(victim["pid"], signal.SIGKILL)
            elif what.startswith("kill -9 the outbox"):
                victim = [r for r in pd.status() if r["role"] == "outbox" and r["pid"]][0]
                os.kill(victim["pid"], signal.SIGKILL)
            elif what.startswith("gateway refuses"):
                gw.configure(refuse_ms=10000)
            elif what == "restart Redis":
                servers.restart_redis()
            elif what.startswith("restart PostgreSQL"):
                servers.restart_postgres()
            elif what == "gateway timeouts off":
                wait_for(lambda: gw.configure(timeout_rate=0)[0] == 200, 20, what="gatewaysim back")
            continue
        if t >= next_worker_kill:
            workers = [r for r in pd.status() if r["role"] == "worker" and r["pid"]]
            if workers:
                os.kill(rng.choice(workers)["pid"], signal.SIGKILL)
                kills += 1
            next_worker_kill += 4.0
        time.sleep(0.1)
    log("faults stopped (%d workers killed)" % kills)
    done.set()


def failovers(pd):
    for line in pd.metrics().splitlines():
        if line.startswith("paymentd_gateway_failovers_total "):
            return line.split()[-1]
    return "?"


def check(servers, account, load, gateways, subscriber, hooks, prober, pd):
    """Waits up to SETTLE_S for the system to settle, then counts what is wrong."""
    def payments():
        return {r[0]: (r[1], int(r[2])) for r in servers.sql(
            "SELECT public_id, status, id FROM payment_intents WHERE account_id = %s" % account)}

    def settled():
        rows = payments()
        pending = servers.sql("SELECT count(*) FROM outbox WHERE account_id = %s AND sent_at IS NULL" % account)
        refunding = servers.sql("SELECT count(*) FROM refunds WHERE account_id = %s AND status = 'pending'" % account)
        return all(s in FINAL for s, _ in rows.values()) and pending[0][0] == "0" and refunding[0][0] == "0"

    try:
        wait_for(settled, SETTLE_S, interval=1,
                 what="every payment and refund final and every event published")
    except AssertionError as e:
        log("not settled: %s" % str(e)[:200])
    # Deliveries in flight finish within the webhook timeout.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if servers.sql("SELECT count(*) FROM webhook_deliveries d JOIN outbox o ON o.id = d.outbox_id"
                       " WHERE o.account_id = %s AND d.status IN ('pending', 'failed')" % account)[0][0] == "0":
            break
        time.sleep(0.5)
    time.sleep(1)

    rows = payments()
    lost = [(pid, st) for pid, st in load.ok if pid not in rows or rows[pid][0] not in LATER.get(st, {st})]
    stuck = [pid for pid, (st, _) in rows.items() if st not in FINAL]

    ledger = [ch for g in gateways for ch in g.ledger()["data"]]
    charges = collections.Counter()
    charged = set()
    for ch in ledger:
        pid = (ch.get("idempotency_key") or "").split(":")[0]
        if pid in rows:
            charges[pid] += 1
            if ch.get("status") == "succeeded":
                charged.add(pid)
    double = [pid for pid, n in charges.items() if n > 1]
    if double:  # the service's own account of the first one
        print("\n".join(line for line in pd.logs().splitlines() if double[0] in line))
    for pid in double[:3]:  # what the gateways hold for them, for the report
        print("  ledger for %s: %r" % (pid, [(ch.get("status"), ch.get("idempotency_key"))
                                          for ch in ledger if (ch.get("idempotency_key") or "").startswith(pid + ":")]))
    succeeded = {pid for pid, (st, _) in rows.items() if st == "succeeded"}
    mismatch = sorted(charged ^ succeeded)

    events = servers.sql(
        "SELECT o.event_id, o.aggregate_id, o.type, o.id, coalesce(o.payload->'data'->'object'->>'id', ''),"
        " coalesce(o.payload->'data'->'object'->>'status', '') FROM outbox o WHERE o.account_id = %s ORDER BY o.id"
        % account)
    by_payment = collections.defaultdict(list)
    # refund id -> [(type, status)]; ("charge.refunded", payment id) -> [...]
    refund_events = collections.defaultdict(list)
    for eid, pid, etype, oid, obj_id, obj_status in events:
        if etype.startswith("payment_intent."):
            by_payment[pid].append((int(oid), eid, etype))
        elif etype == "charge.refunded":
            refund_events[("charge.refunded", pid)].append((etype, obj_status))
        elif etype.startswith("refund."):
            refund_events[obj_id].append((etype, obj_status))
    # A payment's own attempts; its refunds' are counted with the refunds.
    txns = {r[0]: int(r[1]) for r in servers.sql(
        "SELECT p.public_id, count(t.*) FROM payment_intents p LEFT JOIN payment_transactions t"
        " ON t.payment_intent_id = p.id AND t.type NOT IN ('refund', 'refund_cancel')"
        " WHERE p.account_id = %s GROUP BY p.public_id" % account)}
    event_mismatch = []
    for pid, (st, _) in rows.items():
        evs = by_payment.get(pid, [])
        # One event for the creation and one for each outcome a worker recorded.
        if len(evs) != 1 + txns.get(pid, 0) or evs[0][2] != "payment_intent.created" or \
                (st in FINAL_EVENT and evs[-1][2] != FINAL_EVENT[st]):
            event_mismatch.append((pid, st, [e[2] for e in evs]))
    all_ids = {e[0] for e in events}
    order = {e[0]: int(e[3]) for e in events}

    def sink_figures(received):
        seen, first = set(), []
        for eid, pid in received:
            if eid in all_ids and eid not in seen:
                seen.add(eid)
                first.append((eid, pid))
        missing = all_ids - seen
        last = {}
        disorder = 0
        for eid, pid in first:
            if pid in last and order[eid] < last[pid]:
                disorder += 1
            last[pid] = max(last.get(pid, 0), order[eid])
        return missing, disorder, len(received) - len(first)

    # ---- refunds ----
    money = {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in servers.sql(
        "SELECT public_id, amount_received, amount_refunded, amount_refund_pending FROM payment_intents"
        " WHERE account_id = %s" % account)}
    db_refunds = {r[0]: (r[1], r[2], int(r[3])) for r in servers.sql(
        "SELECT r.public_id, p.public_id, r.status, r.amount FROM refunds r JOIN payment_intents p"
        " ON p.id = r.payment_intent_id WHERE r.account_id = %s" % account)}
    refunds_lost = [(rid, pid, st, db_refunds.get(rid, (None, "missing"))[1])
                    for rid, pid, _, st in load.refunds_ok
                    if rid not in db_refunds or (st in REFUND_FINAL and db_refunds[rid][1] != st)]
    db_refunded = collections.Counter()
    for rid, (pid, st, amount) in db_refunds.items():
        if st == "succeeded":
            db_refunded[pid] += amount
    gw_refunded = collections.Counter()
    gw_pending, above_captured = [], []
    for ch in ledger:
        pid = (ch.get("idempotency_key") or "").split(":")[0]
        for x in ch.get("refunds") or []:
            if x.get("status") == "succeeded":
                gw_refunded[pid] += x.get("amount") or 0
            elif x.get("status") == "pending":
                gw_pending.append((pid, x.get("id")))
        if (ch.get("amount_refunded") or 0) > (ch.get("amount_captured") or 0):
            above_captured.append((pid, ch.get("id"), ch.get("amount_captured"), ch.get("amount_refunded")))
    refunds_doubled = [(pid, gw_refunded[pid], db_refunded[pid]) for pid in sorted(gw_refunded)
                       if gw_refunded[pid] > db_refunded[pid]]
    refund_totals = [(pid, gw_refunded[pid], db_refunded[pid], money.get(pid, (0, 0, 0))[1])
                     for pid in sorted(set(gw_refunded) | set(db_refunded) | {p for p, m in money.items() if m[1]})
                     if not gw_refunded[pid] == db_refunded[pid] == money.get(pid, (0, 0, 0))[1]
                     and gw_refunded[pid] <= db_refunded[pid]]
    refunds_stuck = [("refund", rid, pid) for rid, (pid, st, _) in db_refunds.items() if st == "pending"] + \
        [("amount_refund_pending", pid, m[2]) for pid, m in money.items() if m[2]] + \
        [("at the gateway", rid, pid) for pid, rid in gw_pending]
    above_captured += [(pid, "amount_refunded", m[0], m[1]) for pid, m in money.items() if m[1] > m[0]]
    refund_event_mismatch = []
    for rid, (pid, st, _) in db_refunds.items():
        evs = refund_events.get(rid, [])
        want = [("refund.created", "pending")] + ([(REFUND_FINAL_EVENT[st], st)] if st in REFUND_FINAL_EVENT else [])
        if evs != want:
            refund_event_mismatch.append((rid, pid, st, evs))
    for pid in sorted({x[0] for x in refunds_doubled + refund_totals} | {x[1] for x in refunds_lost})[:3]:
        print("  refunds of %s: in PostgreSQL %r; at the gateways %r" % (
            pid, sorted((rid, st, amount) for rid, (p, st, amount) in db_refunds.items() if p == pid),
            [(x.get("id"), x.get("amount"), x.get("status"), x.get("idempotency_key")) for ch in ledger
             if (ch.get("idempotency_key") or "").startswith(pid + ":") for x in ch.get("refunds") or []]))
    succeeded_refunds = collections.Counter(pid for pid, st, _ in db_refunds.values() if st == "succeeded")
    for pid in set(succeeded_refunds) | {k[1] for k in refund_events if isinstance(k, tuple)}:
        n = len(refund_events.get(("charge.refunded", pid), []))
        if n != succeeded_refunds[pid]:
            refund_event_mismatch.append((pid, "charge.refunded", n, succeeded_refunds[pid]))

    nng_missing, nng_disorder, nng_dups = sink_figures(list(subscriber.events))
    with hooks.lock:
        hook_events = list(hooks.events)
    hook_missing, hook_disorder, hook_dups = sink_figures(hook_events)

    timed = [x for x in load.create_latency if x is not None]
    within_1s = sum(1 for x in timed if x <= 1.0) / max(1, len(load.create_latency))
    availability = prober.ok / max(1, prober.ok + prober.failed)

    figures = [
        ("flows started", load.next, None),
        ("payments in PostgreSQL", len(rows), None),
        ("2xx answers recorded", len(load.ok), None),
        ("charges at the gateway (succeeded)", len(charged), None),
        ("gateway providers / failovers", "%d / %s" % (len(gateways), failovers(pd)), None),
        ("succeeded payments", len(succeeded), None),
        ("events written", len(all_ids), None),
        ("lost (2xx then missing or regressed)", len(lost), 0),
        ("double-charged", len(double), 0),
        ("charged != succeeded", len(mismatch), 0),
        ("stuck (not final)", len(stuck), 0),
        ("state changes without exactly one event", len(event_mismatch), 0),
        ("refund flows / 2xx answers to refunds", "%d / %d (confirms answered %s; not refunded: %s)" % (
            load.refund_flows, len(load.refunds_ok), dict(load.confirmed), dict(load.refund_skipped) or "none"),
         None),
        ("refunds in PostgreSQL", "%d: %s" % (len(db_refunds), dict(collections.Counter(
            st for _, st, _ in db_refunds.values()))), None),
        ("refunds lost (2xx then missing or changed)", len(refunds_lost), 0),
        ("refunds doubled (gateway > database)", len(refunds_doubled), 0),
        ("refund totals disagree (gateway/refunds/row)", len(refund_totals), 0),
        ("refunds stuck (pending after the settle time)", len(refunds_stuck), 0),
        ("refunded above captured", len(above_captured), 0),
        ("refund changes without exactly one event", len(refund_event_mismatch), 0),
        ("events missing on NNG", len(nng_missing), 0),
        ("events missing at the webhook", len(hook_missing), 0),
        ("events out of order on NNG", nng_disorder, 0),
        ("events out of order at the webhook", hook_disorder, 0),
        ("unexpected 4xx answers", len(load.unexpected), 0),
        ("500 answers", sum(1 for e in load.errors if e[0] != "gave up"), None),
        ("flows given up by the client", load.gave_up, 0),
        ("duplicate deliveries (NNG / webhook)", "%d / %d" % (nng_dups, hook_dups), None),
        ("creates answered within 1 s", "%.1f %%" % (100 * within_1s), None),
        ("intake availability (/healthz)", "%.2f %%" % (100 * availability), None),
        ("longest /healthz gap", "%.1f s" % prober.longest_gap, None),
        ("answers by status", dict(load.requests), None),
    ]
    failed = []
    print("\n%-44s %s" % ("chaos summary", "value"))
    print("-" * 72)
    for name, value, must in figures:
        bad = must is not None and value != must
        print("%-44s %s%s" % (name, value, "   <-- must be %s" % must if bad else ""))
        if bad:
            failed.append(name)
    if prober.longest_gap > 5:
        failed.append("/healthz did not answer for %.1f s" % prober.longest_gap)
    if load.next < FLOWS:
        failed.append("fewer than %d flows" % FLOWS)
    for name, sample in (("lost", lost), ("double", double), ("mismatch", mismatch), ("stuck", stuck),
                         ("events", event_mismatch), ("nng missing", sorted(nng_missing)),
                         ("refunds lost", refunds_lost), ("refunds doubled", refunds_doubled),
                         ("refund totals (payment, gateway, refunds, amount_refunded)", refund_totals),
                         ("refunds stuck", refunds_stuck), ("refunded above captured", above_captured),
                         ("refund events", refund_event_mismatch),
                         ("webhook missing", sorted(hook_missing)), ("unexpected", load.unexpected),
                         ("server errors and flows given up", load.errors),
                         ("answered after more than 10 s", load.slow)):
        if sample:
            print("  %s, first few: %r" % (name, list(sample)[:5]))
    return failed


def main():
    base = os.environ.get("PAYMENTD_TEST_TMP") or tempfile.gettempdir()
    servers = Servers(base)
    os.environ["POSTGRES_PORT"] = str(servers.pg_port)
    os.environ["REDIS_PORT"] = str(servers.redis_port)
    cleanup = [servers.close]
    try:
        ctl = lambda *a: subprocess.run([os.path.join(BIN, "paymentctl")] + list(a), check=True,
                                        capture_output=True, text=True).stdout.strip()
        ctl("migrate")
        account = ctl("create-account", "chaos")
        key = ctl("create-key", account)
        account_id = servers.sql("SELECT id FROM accounts WHERE public_id = '%s'" % account)[0][0]
        gw = Gateway("--latency-ms", "20")
        cleanup.insert(0, gw.stop)
        gateways = [gw]
        providers = {"GATEWAY_URL": gw.url}
        if PROVIDERS == 2:
            backup = Gateway("--latency-ms", "20")
            cleanup.insert(0, backup.stop)
            gateways.append(backup)
            providers = {"GATEWAY_PROVIDERS": "sim_a,sim_b", "GATEWAY_URL": "%s,%s" % (gw.url, backup.url)}
        hooks = Webhooks()
        cleanup.insert(0, hooks.close)
        # The lease covers a job's worst case with two providers: 4 calls of
        # 1.5 s, 2 back-offs of 200 ms, 4 statements of 1 s.
        pd = Paymentd(**providers, API_PROCESSES=2, WORKERS=2, GATEWAY_TIMEOUT_MS=1500,
                      GATEWAY_MAX_ATTEMPTS=3, GATEWAY_RETRY_CAP_MS=200, DB_STATEMENT_TIMEOUT_MS=1000,
                      PROCESSING_LEASE_MS=10400, SWEEP_INTERVAL_MS=500,
                      CONFIRM_WAIT_MS=3000, BREAKER_OPEN_MS=2000, WEBHOOK_ALLOW_PRIVATE=1,
                      OUTBOX_POLL_MS=200, WEBHOOK_TIMEOUT_MS=5000, DB_QUEUE_TIMEOUT_MS=1000,
                      RESTART_INTENSITY=100)
        cleanup.insert(0, pd.cleanup)
        pd.start()
        wait_for(lambda: pd.json("/readyz")[0] == 200, 30, what="ready")
        conn = http.client.HTTPConnection("127.0.0.1", pd.port, timeout=10)
        conn.request("POST", "/v1/webhook_endpoints",
                     urllib.parse.urlencode({"url": "http://127.0.0.1:%d/hook" % hooks.port,
                                             "enabled_events[0]": "*"}),
                     {"Authorization": "Bearer " + key, "Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        conn.close()
        subscriber = Subscriber(pd)
        cleanup.insert(0, subscriber.close)
        time.sleep(1)

        load = Load(pd.port, key, "chaos%d" % os.getpid())
        prober = Prober(pd.port)
        done = threading.Event()
        log("load: %d flows from %d clients; %d gateway provider(s); faults for %d s"
            % (FLOWS, CLIENTS, PROVIDERS, FAULT_SECONDS))
        load.start()
        faults(pd, gw, servers, done)
        load.keep_going = False
        load.join()
        log("load done: %d flows, %d 2xx answers" % (load.next, len(load.ok)))
        failed = check(servers, account_id, load, gateways, subscriber, hooks, prober, pd)
        prober.stop()
        if failed:
            print("\nCHAOS FAILED: " + "; ".join(failed))
            print(pd.logs(4000))
            return 1
        print("\nchaos passed: nothing lost, nothing charged or refunded twice, nothing stuck, no event missing")
        return 0
    finally:
        for f in cleanup:
            try:
                f()
            except Exception as e:  # keep tearing down
                print("teardown:", e)


if __name__ == "__main__":
    sys.exit(main())
