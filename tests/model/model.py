#!/usr/bin/env python3
"""The model-based checker: hundreds of payments driven concurrently through
random programs of every PaymentIntent operation while workers and an api
process are killed and the gateway times out, then every payment is checked
against gatewaysim's ledger and the database.

Each payment runs a program of 3-10 steps drawn from a random generator of
its own (seeded from MODEL_SEED and the payment's number): create (automatic
or manual capture, with or without a payment method, confirmed or not),
confirm with every test payment method, confirm again during 3-D Secure,
update (metadata, amount, payment method; also where it must be refused),
capture (full, partial, too much), cancel (in every state), concurrent pairs
on one payment (capture||cancel, capture||capture, confirm||cancel,
confirm||confirm, the same request twice under one Idempotency-Key),
re-sends of an earlier request with its key, raw card numbers, expiry forced
with SQL, retrieves and pauses of 0-2 s so that the gateway's callbacks land
in between. A payment that succeeded gets a few more steps of refunds:
full and partial ones, by payment or by charge id, 2-4 at once whose sum is
above what is left to refund, the same refund twice under one key, re-sends,
refunds that fail at the gateway, cancels of refunds the gateway holds as
pending (at once, late so as to race the settlement, and two at once; of
final ones, which must be refused), retrieves, lists and the charge's view,
and refunds that must be refused and change nothing (of a payment that did
not succeed, of more than is left, of an unknown payment). The next step
follows the last status seen, and now and then an operation the state does
not allow is sent on purpose. A scheduler runs the
steps of every payment on MODEL_CLIENTS threads (keep-alive connections), so
that all payments are in flight at once and a pause holds no thread.

Faults: gatewaysim times out on MODEL_TIMEOUT_RATE % of calls after doing
them; with MODEL_KILLS=1 a random worker is killed (-9) every few seconds and
an api process once or twice; gatewaysim's callbacks come late, out of order
and duplicated. gatewaysim's refunds change phase every few seconds
(MODEL_ASYNC_REFUND unset): answered at once or pending until they settle
by callback (--async-refund), and with or without a share failing
(refund_fail_rate). Then a quiet period: the faults stop and the checker
waits (up to 90 s) until no payment is processing, no attempt or refund is
pending (async refunds settle after the callback delay; one whose callback
was lost is re-driven by the sweeps after PROCESSING_LEASE_MS) and neither
the database nor the ledger has changed for a while.

The rules, per payment (a violation names the payment and the rule, and the
first payments of each rule are printed with their whole story: the
requests and answers, the payment row, its payment_transactions, its outbox
events, its gateway callbacks and its charges at the gateway):

   1 money       sum over its charges of (captured - refunded) at the gateway
                 equals amount_received - amount_refunded
   2 captured    no captured charge on a canceled payment, nor on one that
                 ended requires_payment_method or requires_confirmation
   3 authorized  requires_capture: exactly one charge in requires_capture with
                 amount_authorized = amount_capturable; otherwise none
   4 open        no authorization or pending 3-D Secure charge left on a
                 canceled payment; at most one requires_action charge, and
                 only on a payment in requires_action
   5 double      at most one charge with captured money; succeeded exactly
                 when amount_received > 0
   6 stuck       nothing processing, no attempt pending in the database or at
                 the gateway after the quiet period
   7 events      one payment_intent.created first; one succeeded / canceled
                 event exactly when the payment ended so, nothing after it;
                 the last event agrees with the final status; every state an
                 answer showed has its event; no event for processing
   8 idempotency a re-send with the same key answers the same status and
                 body (409, 5xx and unstored validation errors aside); a keyed
                 create makes one payment
   9 answers     no 500; a 200 to capture shows succeeded or processing, to
                 cancel canceled or processing; operations the observed state
                 forbids are refused; of two concurrent captures (or a capture
                 and a cancel) at most one answers 200; no amount change during
                 requires_action; no confirm without a payment method after a
                 decline
  10 raw card    requests with card numbers are refused and leave no trace in
                 payments, events or at the gateway
  11 terminal    once an answer showed succeeded or canceled, the payment ends so
  12 expiry      no open payment or authorization left past its expires_at
  13 refund money  the gateway's succeeded refunds of the payment's charges (and
                 their amount_refunded) = the sum of its succeeded refunds in
                 the refunds table = payment_intents.amount_refunded, and never
                 above amount_received (nor a charge's above its capture)
  14 refund stuck  amount_refund_pending 0, no refund pending in the database
                 or at the gateway after the quiet period
  15 refund fate   every refund in the database has its gateway refund (same
                 key) in the same state: succeeded as succeeded, a canceled
                 one canceled there (it refunded nothing), a failed one failed
                 or never made; no gateway refund without its row; a refund
                 any answer showed succeeded, failed or canceled ends so; every
                 refund answered 2xx exists, with the amount answered
  16 refund events one refund.created per refund, then exactly one refund.updated
                 (succeeded or canceled) or refund.failed as it ended; one
                 charge.refunded per succeeded refund
  17 refund answers a refund of a payment that did not succeed, of more than
                 is left, or a cancel of a final refund is refused (with
                 Stripe's code) and changes nothing; a 200 shows the amount
                 asked for and a refund status; concurrent refunds accepted
                 never exceed what was captured and not yet refunded; a
                 succeeded payment's first refund within its capture is not
                 refused; the charge's view adds up

Environment: MODEL_SEED (random when unset; always printed with the command
that runs the same programs again), MODEL_N payments (300), MODEL_CLIENTS
threads (16), MODEL_KILLS (1: kill workers and an api process; 0: no kills),
MODEL_TIMEOUT_RATE percent (3), MODEL_ASYNC_CAPTURE (0; 1: captures settle by
callback), MODEL_ASYNC_REFUND (unset: phases of both; 1: every refund pends
and settles by callback; 0: none does), MODEL_REFUND_FAIL_RATE percent
(unset: phases of 0 and 25), MODEL_DETAILS (payments printed in full per
rule, 3), MODEL_REPORT (a file for the full report; default in the temp
directory). `--self-test` also pretends one payment's bookkeeping is off by
one cent and one succeeded refund of another payment failed, and exits 0
only if the checker catches them loudly (rule 1; rules 13 and 15). Servers:
its own PostgreSQL and Redis (scripts/lib.sh), gatewaysim and paymentd (PAYMENTD_BIN,
PAYMENTD_SOURCE, PAYMENTD_TEST_TMP as for the other tests). Exit status 1
when any rule is violated.
"""
import argparse
import collections
import hashlib
import heapq
import http.client
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
from harness import BIN, SOURCE, Paymentd, free_port, wait_for  # noqa: E402

T0 = time.monotonic()

RPM, RC, RA = "requires_payment_method", "requires_confirmation", "requires_action"
PROCESSING, RCAP = "processing", "requires_capture"
SUCCEEDED, CANCELED, UNKNOWN = "succeeded", "canceled", "unknown"
OPEN = (RPM, RC, RA)
TERMINAL = (SUCCEEDED, CANCELED)

PMS = {"visa": "pm_card_visa",
       "declined": "pm_card_chargeDeclined",
       "insufficient": "pm_card_insufficientFunds",
       "3ds": "pm_card_authenticationRequired",
       "3ds_fail": "pm_card_authenticationRequiredChargeDeclinedInsufficientFunds"}
PM_WEIGHTS = [("visa", 30), ("declined", 9), ("insufficient", 7), ("3ds", 38), ("3ds_fail", 16)]
RAW_CARDS = ["4242424242424242", "4000056655665556", "5555555555554444"]

EV = "payment_intent."
EVENT_TYPES = {EV + t for t in ("created", "requires_action", "amount_capturable_updated",
                                "succeeded", "payment_failed", "canceled")}
# The event the last state change of a payment that ended in a status writes.
LAST_EVENT = {SUCCEEDED: {EV + "succeeded"}, CANCELED: {EV + "canceled"},
              RCAP: {EV + "amount_capturable_updated"}, RA: {EV + "requires_action"},
              RPM: {EV + "created", EV + "payment_failed"},
              RC: {EV + "created", EV + "payment_failed"}}
# A status shown in an answer: the event its change wrote.
STATE_EVENT = {RA: EV + "requires_action", RCAP: EV + "amount_capturable_updated",
               SUCCEEDED: EV + "succeeded", CANCELED: EV + "canceled"}

RULES = collections.OrderedDict([
    (1, "money: gateway captured - refunded = amount_received - amount_refunded"),
    (2, "captured money on a canceled or failed payment"),
    (3, "authorization at the gateway does not match requires_capture"),
    (4, "open authorization or 3-D Secure charge left behind"),
    (5, "double charge / succeeded without money"),
    (6, "stuck: processing or pending after the quiet period"),
    (7, "events"),
    (8, "idempotent re-send answered differently"),
    (9, "HTTP answers"),
    (10, "raw card number accepted or stored"),
    (11, "terminal state did not stay"),
    (12, "expiry not applied"),
    (13, "refund money: gateway refunded = succeeded refunds = amount_refunded <= amount_received"),
    (14, "refund stuck: pending after the quiet period"),
    (15, "refund fate: database and gateway disagree, or an answered outcome changed"),
    (16, "refund events"),
    (17, "refund answers"),
])

# Refunds: their statuses, the operations that make or touch them (these
# never change the client's view of the payment's status) and their events.
RPENDING, RSUCCEEDED, RFAILED, RCANCELED = "pending", "succeeded", "failed", "canceled"
REFUND_FINAL = (RSUCCEEDED, RFAILED, RCANCELED)
REFUND_OPS = ("refund", "refund cancel", "refund retrieve", "refund list", "refund update",
              "charge retrieve", "charge list")
REFUND_REASONS = ["duplicate", "fraudulent", "requested_by_customer"]
# The event a refund's last change writes, by the status it ended in.
REFUND_FINAL_EVENT = {RSUCCEEDED: "refund.updated", RCANCELED: "refund.updated", RFAILED: "refund.failed"}


def env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def env_opt_int(name):
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def log(msg):
    print("[model %6.1fs] %s" % (time.monotonic() - T0, msg), flush=True)


def lib(script, timeout=120):
    r = subprocess.run(["bash", "-c", "source %s/scripts/lib.sh; %s" % (SOURCE, script)],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError("%s: %s %s" % (script, r.stdout, r.stderr))


# ---------------------------------------------------------------- servers --

class Servers:
    """A private PostgreSQL and Redis, as in the chaos suite."""

    def __init__(self, base):
        self.dir = tempfile.mkdtemp(prefix="model-", dir=base)
        os.chmod(self.dir, 0o755)
        self.pg_data = os.path.join(self.dir, "pg")
        self.redis_dir = os.path.join(self.dir, "redis")
        self.pg_port, self.redis_port = free_port(), free_port()
        self.host = os.environ.get("POSTGRES_HOST", "127.0.0.1")
        lib("pg_start %s %d && pg_ensure_db %d" % (self.pg_data, self.pg_port, self.pg_port))
        lib("redis_start %s %d no" % (self.redis_dir, self.redis_port))

    def sql(self, query, timeout=60):
        r = subprocess.run(["psql", "-h", self.host, "-p", str(self.pg_port), "-U", "paymentd",
                            "-d", "paymentd", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                            "-c", query], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError("psql: %s (%s)" % (r.stderr.strip(), query[:200]))
        return r.stdout.strip()

    def json(self, query):
        out = self.sql(query)
        return json.loads(out) if out else None

    def close(self):
        for script in ("redis_stop %s" % self.redis_dir, "pg_stop %s immediate" % self.pg_data):
            try:
                lib(script)
            except Exception as e:  # keep tearing down
                print("teardown:", e)
        shutil.rmtree(self.dir, True)


class Gateway:
    """gatewaysim with callbacks; a flag this build does not know yet is
    dropped (and reported) so that the checker runs against older builds."""

    def __init__(self, flags, log_dir):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log_path = os.path.join(log_dir, "gatewaysim.log")
        self.unsupported = []
        wanted = list(flags)
        while True:
            argv = [os.path.join(BIN, "gatewaysim"), "--port", str(self.port)]
            for flag, value in wanted:
                argv += [flag] if value is None else [flag, str(value)]
            self.log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log,
                                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
            deadline = time.monotonic() + 15
            up = False
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    up = self.request("GET", "/v1/ledger", timeout=2)[0] == 200
                except (OSError, http.client.HTTPException, ValueError):
                    up = False
                if up:
                    break
                time.sleep(0.05)
            if up:
                return
            self.stop()
            with open(self.log_path, errors="replace") as f:
                text = f.read()
            m = re.findall(r"unrecognized option '?(--[a-z-]+)", text)
            bad = [f for f in wanted if m and f[0] == m[-1]]
            if not bad:
                raise RuntimeError("gatewaysim did not start: %s" % text[-2000:])
            self.unsupported.append(bad[0][0])
            wanted.remove(bad[0])

    def request(self, method, path, body=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            conn.close()

    def ledger(self):
        code, body = self.request("GET", "/v1/ledger", timeout=60)
        if code != 200:
            raise RuntimeError("ledger: %s" % code)
        return body

    def configure(self, **kw):
        return self.request("POST", "/_config", kw)

    def tail(self, n=3000):
        try:
            with open(self.log_path, errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
        i = text.find("ERROR: AddressSanitizer")
        if i >= 0:  # the sanitizer's report, without its shadow-byte map
            j = text.find("Shadow bytes around", i)
            return text[i:j if j > 0 else i + 8000]
        return text[-n:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------- HTTP --

class Answer:
    __slots__ = ("code", "body", "obj", "replayed", "error", "latency")

    def __init__(self, code=None, body=b"", replayed=False, error=None, latency=0.0):
        self.code, self.body, self.replayed, self.error, self.latency = code, body, replayed, error, latency
        self.obj = None
        if body:
            try:
                self.obj = json.loads(body)
            except ValueError:
                self.obj = None

    @property
    def pi(self):
        o = self.obj
        if not isinstance(o, dict):
            return None
        if self.code == 200 and o.get("object") == "payment_intent":
            return o
        if self.code == 402 and isinstance(o.get("error"), dict):
            pi = o["error"].get("payment_intent")
            return pi if isinstance(pi, dict) else None
        return None

    @property
    def status(self):
        pi = self.pi
        return pi.get("status") if pi else None

    @property
    def refund(self):
        """The refund a 2xx answer shows (a create, retrieve, update or cancel)."""
        o = self.obj
        if self.code == 200 and isinstance(o, dict) and o.get("object") == "refund":
            return o
        return None

    def refunds_shown(self):
        """Every refund the answer shows: itself, a list's, a charge's."""
        o = self.obj
        if self.code != 200 or not isinstance(o, dict):
            return []
        if o.get("object") == "refund":
            return [o]
        items = []
        if o.get("object") == "list":
            for x in o.get("data") or []:
                if isinstance(x, dict) and x.get("object") == "refund":
                    items.append(x)
                elif isinstance(x, dict) and x.get("object") == "charge":
                    items += ((x.get("refunds") or {}).get("data") or [])
        elif o.get("object") == "charge":
            items = (o.get("refunds") or {}).get("data") or []
        return [x for x in items if isinstance(x, dict)]

    @property
    def err_code(self):
        o = self.obj
        if isinstance(o, dict) and isinstance(o.get("error"), dict):
            return o["error"].get("code") or o["error"].get("type")
        return None

    @property
    def definite(self):
        return self.code is not None and self.code < 500 and self.code not in (409, 429)

    def short(self):
        if self.code is None:
            return "no answer (%s)" % self.error
        s = str(self.code)
        o = self.obj if isinstance(self.obj, dict) else {}
        if self.refund:
            s += " refund %s %s %s" % (o.get("id"), o.get("amount"), o.get("status"))
        elif self.code == 200 and o.get("object") == "list":
            s += " list of %d" % len(o.get("data") or [])
        elif self.code == 200 and o.get("object") == "charge":
            s += " charge %s captured %s refunded %s" % (o.get("id"), o.get("amount_captured"),
                                                         o.get("amount_refunded"))
        elif self.status:
            s += " " + self.status
        elif self.err_code:
            s += " " + self.err_code
        if self.code == 400 and self.err_code == "payment_intent_unexpected_state":
            m = re.search(r"status of (\w+)", (self.obj or {}).get("error", {}).get("message", ""))
            if m:
                s += " (was %s)" % m.group(1)
        if self.replayed:
            s += " [replayed]"
        return s


class Api:
    """Form-encoded requests with a Bearer key; one keep-alive connection per
    thread (a fresh one for the two sides of a concurrent pair)."""

    IDLE_S = 5.0

    def __init__(self, port, key):
        self.port, self.key = port, key
        self.local = threading.local()

    def _conn(self):
        c = getattr(self.local, "conn", None)
        if c is not None and time.monotonic() - self.local.used > self.IDLE_S:
            c.close()
            c = None
        if c is None:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
            self.local.conn = c
        return c

    def _drop(self):
        c = getattr(self.local, "conn", None)
        if c is not None:
            c.close()
        self.local.conn = None

    def call(self, method, path, params=None, key=None, fresh=False):
        headers = {"Authorization": "Bearer " + self.key}
        body = None
        if method == "POST":
            body = urllib.parse.urlencode(params or {})
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif params:
            path += "?" + urllib.parse.urlencode(params)
        if key:
            headers["Idempotency-Key"] = key
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20) if fresh else self._conn()
        start = time.monotonic()
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            a = Answer(r.status, data, (r.getheader("Idempotent-Replayed") or "").lower() == "true",
                       latency=time.monotonic() - start)
            if fresh or r.will_close:
                conn.close()
                if not fresh:
                    self.local.conn = None
            else:
                self.local.used = time.monotonic()
            return a
        except (OSError, http.client.HTTPException) as e:
            if fresh:
                conn.close()
            else:
                self._drop()
            return Answer(None, b"", error="%s: %s" % (type(e).__name__, e), latency=time.monotonic() - start)


# --------------------------------------------------------------- programs --

class Pay:
    """One payment's program, its client-side view and its recorded story."""

    def __init__(self, model, idx):
        self.m, self.idx = model, idx
        self.rng = random.Random("%d:%d" % (model.seed, idx))
        self.steps_total = self.rng.randint(3, 10)
        self.steps_done = 0
        self.pid = None
        self.status = None           # the last status an answer showed (not a replay)
        self.amount = None
        self.capturable = 0
        self.capture_method = None
        self.declined = False        # the last attempt answered 402 and no method came since
        self.created_keyed = False
        self.history = []            # dicts, in the order answers came
        self.lock = threading.Lock()
        self.keyed = []              # (op, method, path, params, key, first definite answer)
        self.resends = []            # (op, key, first answer, second answer, how)
        self.answers = []            # (op, answer) of every request
        self.violations = []         # (rule, message) seen while running
        self.nkey = 0
        self.pairs = 0
        # Refunds: what the client knows of them.
        self.received = 0            # amount_received, as the last answer showed it
        self.latest_charge = None
        self.refund_seen = collections.defaultdict(list)  # refund id -> [(op, status, amount, replayed)]
        self.refunds_sent = 0        # refund creates sent (a re-send not counted)
        self.refund_lost = False     # a refund create got no definite answer
        self.refund_bonus = False    # the extra refund steps were drawn

    # ---- recording ----

    def new_key(self, op):
        self.nkey += 1
        return "%s-%d-%s-%d" % (self.m.run, self.idx, op.replace(" ", "_"), self.nkey)

    def record(self, op, params, key, a, tag):
        entry = {"t": time.monotonic() - T0, "thread": threading.current_thread().name, "op": op,
                 "params": params, "key": key, "answer": a, "tag": tag}
        with self.lock:
            self.history.append(entry)
            self.answers.append((op, a))
        self.m.count(op, a)
        if a.code == 500:
            self.flag(9, "%s answered 500: %s" % (op, a.body[:300].decode(errors="replace")))
        return entry

    def flag(self, rule, message):
        with self.lock:
            self.violations.append((rule, message))

    def note(self, text):
        with self.lock:
            self.history.append({"t": time.monotonic() - T0, "thread": threading.current_thread().name,
                                 "op": text, "params": None, "key": None, "answer": None, "tag": ""})

    def observe(self, op, a):
        """Updates the client's view from an answer (replays show the past)."""
        if op in REFUND_OPS:
            return  # refunds never change the payment's status: observe_refund
        if a.replayed:
            return
        pi = a.pi
        if pi:
            self.received = pi.get("amount_received") or 0
            self.latest_charge = pi.get("latest_charge") or self.latest_charge
            self.status = pi.get("status")
            self.amount = pi.get("amount", self.amount)
            self.capturable = pi.get("amount_capturable") or 0
            self.capture_method = pi.get("capture_method", self.capture_method)
            if a.code == 402:
                self.declined = True
        elif a.code == 400 and a.err_code == "payment_intent_unexpected_state":
            m = re.search(r"status of (\w+)", a.obj["error"].get("message", ""))
            if m:
                if m.group(1) != self.status:
                    # Learnt from an error: the charge it names may be
                    # another one now (a new attempt succeeded since).
                    self.latest_charge = None
                self.status = m.group(1)
        elif a.code is None or a.code >= 500:
            if op != "retrieve":
                self.status = UNKNOWN

    # ---- sending ----

    def send(self, op, method, path, params, keyed=True, key=None, retries=4, tag="", fresh=False,
             observe=True):
        """One request; with a key, a lost or 5xx/409/429 answer is retried
        with the same key, as a client does. Returns the last answer."""
        if keyed and key is None:
            key = self.new_key(op)
        delays = [0.3, 0.8, 1.5, 2.5, 3, 3, 3, 3][:retries if key else 0]
        tries = [tag]
        if method == "GET":
            delays = [0.2]  # a read is safe to repeat
        while True:
            a = self.m.api.call(method, path, params, key, fresh=fresh)
            self.record(op, params, key, a, tries[-1])
            if a.definite or not delays:
                break
            time.sleep(delays.pop(0))
            tries.append((tag + " " if tag else "") + "retry")
        if op in REFUND_OPS:
            self.observe_refund(op, a)
        elif observe:
            self.observe(op, a)
        if key and a.definite and method == "POST":
            self.keyed.append((op, method, path, params, key, a))
        return a

    def path(self, suffix=""):
        return "/v1/payment_intents/%s%s" % (self.pid, suffix)

    def observe_refund(self, op, a):
        """Records every refund an answer shows (replays too: a final status
        once shown must stay)."""
        for x in a.refunds_shown():
            if x.get("payment_intent") not in (None, self.pid):
                self.flag(17, "%s answered refund %s of payment %s" % (op, x.get("id"), x.get("payment_intent")))
                continue
            with self.lock:
                self.refund_seen[x.get("id")].append((op, x.get("status"), x.get("amount"), a.replayed))
    def pick_pm(self):
        kinds, weights = zip(*PM_WEIGHTS)
        return PMS[self.rng.choices(kinds, weights)[0]]

    # ---- answer checks while running (rule 9) ----

    def check_refused(self, op, before, a):
        """An operation the state `before` (seen in a definite answer, with
        nothing of ours in flight) forbids, whatever callbacks, sweeps or
        expiry do meanwhile, must be refused."""
        if a.replayed or a.code not in (200, 402):
            return
        forbidden = (before in TERMINAL and op in ("capture", "cancel", "confirm", "update")) or \
                    (before == RCAP and op in ("confirm", "update")) or \
                    (before in (RPM, RC) and op == "capture")
        if forbidden:
            self.flag(9, "%s was accepted (%s) although the payment was %s" % (op, a.short(), before))

    def check_answer(self, op, a):
        if a.code != 200 or a.replayed:
            return
        if op == "capture" and a.status not in (SUCCEEDED, PROCESSING):
            self.flag(9, "capture answered 200 with status %s" % a.status)
        if op == "cancel" and a.status not in (CANCELED, PROCESSING):
            self.flag(9, "cancel answered 200 with status %s" % a.status)

    # ---- the program ----

    def pause(self):
        x = self.rng.random()
        if x < 0.5:
            return self.rng.uniform(0, 0.3)
        if x < 0.85:
            return self.rng.uniform(0.3, 1.2)
        return self.rng.uniform(1.2, 2.0)

    WEIGHTS = {
        RPM: [("confirm_pm", 6), ("confirm_nopm", 1.2), ("update_meta", 1), ("update_amount", 1),
              ("update_pm", 0.6), ("cancel", 1.5), ("confirm_then_cancel", 1), ("pair_confirm_cancel", 1),
              ("pair_confirm_confirm", 1), ("same_key_pair", 0.4), ("capture", 0.4), ("resend", 1),
              ("rawcard", 0.4), ("expire", 0.5), ("retrieve", 0.4), ("refund_illegal", 0.3)],
        RC: [("confirm_nopm", 5), ("confirm_pm", 2), ("update_meta", 1), ("update_amount", 1),
             ("cancel", 1.5), ("confirm_then_cancel", 1), ("pair_confirm_cancel", 1),
             ("pair_confirm_confirm", 1), ("same_key_pair", 0.4), ("capture", 0.4), ("resend", 1),
             ("rawcard", 0.4), ("expire", 0.5), ("retrieve", 0.3), ("refund_illegal", 0.3)],
        RA: [("confirm_pm", 4), ("confirm_nopm", 2.5), ("cancel", 2.5), ("update_amount", 1),
             ("update_meta", 0.7), ("capture", 0.4), ("confirm_then_cancel", 1), ("pair_confirm_cancel", 1.2),
             ("pair_confirm_confirm", 1.5), ("wait", 2), ("expire", 0.8), ("resend", 1), ("rawcard", 0.3),
             ("retrieve", 0.5)],
        PROCESSING: [("retrieve", 3), ("wait", 2), ("cancel", 1), ("capture", 0.5), ("confirm_nopm", 0.5),
                     ("resend", 0.5)],
        RCAP: [("capture_full", 3), ("capture_partial", 2.5), ("capture_too_much", 0.4), ("cancel", 2.5),
               ("pair_capture_cancel", 2), ("pair_capture_capture", 1.5), ("expire", 1), ("update_meta", 0.5),
               ("confirm_pm", 0.4), ("resend", 1), ("retrieve", 0.3), ("rawcard", 0.2), ("refund_illegal", 0.6)],
        SUCCEEDED: [("capture", 1), ("cancel", 1), ("confirm_pm", 0.8), ("update_meta", 0.7), ("resend", 1.5),
                    ("retrieve", 0.5), ("rawcard", 0.3),
                    ("refund_partial", 3.5), ("refund_full", 0.8), ("refund_by_charge", 1.2),
                    ("refund_concurrent", 1.2), ("refund_same_key", 0.4), ("refund_then_cancel", 2),
                    ("refund_cancel_twice", 0.6), ("refund_cancel_final", 0.4), ("refund_fail", 0.6),
                    ("refund_too_much", 0.6), ("refund_unknown", 0.2), ("refund_resend", 1), ("refund_read", 1),
                    ("refund_update", 0.3)],
        CANCELED: [("capture", 1), ("cancel", 1), ("confirm_pm", 0.8), ("update_meta", 0.7), ("resend", 1.5),
                   ("retrieve", 0.5), ("rawcard", 0.3), ("refund_illegal", 0.8)],
        UNKNOWN: [("retrieve", 4), ("resend", 1)],
    }

    def step(self):
        """Runs one step; returns the pause before the next, or None when done."""
        if self.status == SUCCEEDED and not self.refund_bonus and self.m.refunds:
            self.refund_bonus = True  # a few more steps: refunds
            if self.latest_charge is None:
                self.a_retrieve()
            if self.rng.random() < 0.75:
                extra = self.rng.randint(2, 5)
                self.steps_total += extra
                self.note("succeeded: %d more steps for refunds" % extra)
        if self.steps_done >= self.steps_total:
            return None
        self.steps_done += 1
        if self.pid is None:
            if self.steps_done > 1:
                return None  # the create never got an answer: nothing to drive
            self.a_create()
            return self.pause()
        weights = self.WEIGHTS.get(self.status, self.WEIGHTS[UNKNOWN])
        if not self.m.refunds:  # a build without refunds
            weights = [(n, x) for n, x in weights if not n.startswith("refund")]
        names, w = zip(*weights)
        action = self.rng.choices(names, w)[0]
        self.m.count_step(action)
        extra = getattr(self, "a_" + action)()
        return (extra if isinstance(extra, (int, float)) else 0) + self.pause()

    # ---- actions ----

    def a_create(self):
        r = self.rng
        self.capture_method = "manual" if r.random() < 0.45 else "automatic"
        params = {"amount": r.randint(50, 50000), "currency": "usd", "capture_method": self.capture_method,
                  "description": "model payment %d" % self.idx,
                  "metadata[model_idx]": str(self.idx), "metadata[model_run]": self.m.run}
        mode = r.random()
        if mode >= 0.25:
            params["payment_method"] = self.pick_pm()
        if mode >= 0.45:
            params["confirm"] = "true"
        self.created_keyed = r.random() < 0.9
        self.m.count_step("create")
        a = self.send("create", "POST", "/v1/payment_intents", params, keyed=self.created_keyed, retries=8)
        if a.pi:
            self.pid = a.pi["id"]
            with self.m.lock:
                self.m.by_pid[self.pid] = self
        self.check_answer("create", a)

    def confirm(self, with_pm, tag="", fresh=False, keyed=None, observe=True):
        params = {"payment_method": self.pick_pm()} if with_pm else {}
        if keyed is None:
            keyed = self.rng.random() < 0.85
        before, declined = self.status, self.declined
        a = self.send("confirm", "POST", self.path("/confirm"), params, keyed=keyed, tag=tag, fresh=fresh,
                      retries=0 if fresh else 4, observe=observe)
        if not fresh:
            self.check_refused("confirm", before, a)
            if declined and not with_pm and before == RPM and a.code in (200, 402) and not a.replayed:
                self.flag(9, "confirm without a payment method after a decline was accepted (%s); "
                             "the declined method must be detached" % a.short())
        if with_pm:  # a new method: the one declined before is no longer the question
            self.declined = a.code == 402 and not a.replayed and not fresh
        return a

    def a_confirm_pm(self):
        self.confirm(True)

    def a_confirm_nopm(self):
        self.confirm(False)

    def update(self, params, what):
        before, amount_before = self.status, self.amount
        a = self.send("update", "POST", self.path(), params, keyed=self.rng.random() < 0.7, tag=what)
        self.check_refused("update", before, a)
        if what == "amount" and a.code == 200 and not a.replayed and a.status == RA and \
                a.pi.get("amount") == params["amount"] != amount_before:
            self.flag(9, "amount changed from %s to %s during requires_action" % (amount_before, params["amount"]))
        return a

    def a_update_meta(self):
        k = "k%d" % self.rng.randint(0, 3)
        params = {"metadata[%s]" % k: "v%d" % self.rng.randint(0, 999)}
        if self.rng.random() < 0.3:
            params["description"] = "model payment %d updated" % self.idx
        self.update(params, "metadata")

    def a_update_amount(self):
        self.update({"amount": self.rng.randint(50, 50000)}, "amount")

    def a_update_pm(self):
        a = self.update({"payment_method": self.pick_pm()}, "payment_method")
        if a.code == 200 and not a.replayed:
            self.declined = False

    def capture(self, amount=None, tag="", fresh=False, observe=True):
        params = {"amount_to_capture": amount} if amount else {}
        before = self.status
        a = self.send("capture", "POST", self.path("/capture"), params, keyed=self.rng.random() < 0.8, tag=tag,
                      fresh=fresh, retries=0 if fresh else 4, observe=observe)
        self.check_answer("capture", a)
        if not fresh:
            self.check_refused("capture", before, a)
        return a

    def a_capture(self):
        self.capture()

    def a_capture_full(self):
        self.capture()

    def a_capture_partial(self):
        cap = self.capturable or self.amount or 100
        self.capture(self.rng.randint(1, max(1, cap - 1)), tag="partial")

    def a_capture_too_much(self):
        cap = self.capturable or self.amount or 100
        before = self.status
        a = self.capture(cap + self.rng.randint(1, 1000), tag="too much")
        if before == RCAP and a.code == 200 and not a.replayed:
            self.flag(9, "capture of more than amount_capturable (%d) answered 200" % cap)

    def cancel(self, tag="", fresh=False, observe=True):
        params = {}
        if self.rng.random() < 0.3:
            params["cancellation_reason"] = self.rng.choice(["requested_by_customer", "duplicate", "abandoned"])
        before = self.status
        a = self.send("cancel", "POST", self.path("/cancel"), params, keyed=self.rng.random() < 0.8, tag=tag,
                      fresh=fresh, retries=0 if fresh else 4, observe=observe)
        self.check_answer("cancel", a)
        if not fresh:
            self.check_refused("cancel", before, a)
        return a

    def a_cancel(self):
        self.cancel()

    def a_confirm_then_cancel(self):
        self.confirm(self.status == RPM or self.rng.random() < 0.4, tag="then cancel")
        self.cancel(tag="right after confirm")

    def a_retrieve(self):
        a = self.send("retrieve", "GET", self.path(), None, keyed=False)
        return a

    def a_wait(self):
        self.note("wait")
        return self.rng.uniform(1.0, 2.5)

    def a_expire(self):
        try:
            self.m.db.sql("UPDATE payment_intents SET expires_at = now() - interval '1 second'"
                          " WHERE public_id = '%s'" % self.pid)
            self.note("expire (SQL: expires_at = now() - 1 s)")
        except Exception as e:  # the database restarting, say: the step did nothing
            self.note("expire failed: %s" % e)
        return self.rng.uniform(0.3, 1.2)

    def a_resend(self):
        if not self.keyed:
            return self.a_retrieve()
        op, method, path, params, key, first = self.rng.choice(self.keyed)
        a = self.send(op, method, path, params, key=key, retries=0, tag="re-send of %s" % key)
        self.resends.append((op, key, first, a, "re-send"))
        self.m.count_step("resend:" + op)

    def pair(self, name, sides):
        """Fires the sides (callables taking tag, fresh) at once, each on a
        connection of its own; then retrieves the outcome."""
        self.pairs += 1
        tag = "%s #%d" % (name, self.pairs)
        barrier = threading.Barrier(len(sides))
        results = [None] * len(sides)

        def run(i):
            try:
                barrier.wait(10)
            except threading.BrokenBarrierError:
                pass
            results[i] = sides[i](tag)

        threads = [threading.Thread(target=run, args=(i,), name="%s-%s%d" % (threading.current_thread().name,
                                                                            name[:3], i))
                   for i in range(len(sides))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.a_retrieve()
        return results

    def a_pair_capture_cancel(self):
        cap = self.capturable or self.amount
        a, b = self.pair("capture||cancel", [
            lambda tag: self.capture(self.rng.randint(1, cap) if cap and self.rng.random() < 0.4 else None,
                                     tag=tag, fresh=True, observe=False),
            lambda tag: self.cancel(tag=tag, fresh=True, observe=False)])
        self.check_pair("capture||cancel", a, b)

    def a_pair_capture_capture(self):
        a, b = self.pair("capture||capture", [
            lambda tag: self.capture(tag=tag, fresh=True, observe=False),
            lambda tag: self.capture(tag=tag, fresh=True, observe=False)])
        self.check_pair("capture||capture", a, b)

    def a_pair_confirm_cancel(self):
        with_pm = self.status == RPM or self.declined or self.rng.random() < 0.4
        self.pair("confirm||cancel", [
            lambda tag: self.confirm(with_pm, tag=tag, fresh=True, observe=False),
            lambda tag: self.cancel(tag=tag, fresh=True, observe=False)])

    def a_pair_confirm_confirm(self):
        need = self.status == RPM or self.declined
        pms = [need or self.rng.random() < 0.5, need or self.rng.random() < 0.5]
        self.pair("confirm||confirm", [
            lambda tag: self.confirm(pms[0], tag=tag, fresh=True, observe=False),
            lambda tag: self.confirm(pms[1], tag=tag, fresh=True, observe=False)])

    def a_same_key_pair(self):
        """The same confirm twice at once under one key: one runs, the other
        answers 409 or replays the same answer."""
        params = {"payment_method": self.pick_pm()} if self.status == RPM or self.declined else {}
        if params:
            self.declined = False
        key = self.new_key("confirm")
        a, b = self.pair("same key twice", [
            lambda tag: self.send("confirm", "POST", self.path("/confirm"), params, key=key, retries=0,
                                  tag=tag, fresh=True, observe=False),
            lambda tag: self.send("confirm", "POST", self.path("/confirm"), params, key=key, retries=0,
                                  tag=tag, fresh=True, observe=False)])
        if a and b:
            self.resends.append(("confirm", key, a, b, "concurrent"))

    def check_pair(self, name, a, b):
        if a is None or b is None:
            return
        if a.code == 200 and b.code == 200 and not a.replayed and not b.replayed:
            self.flag(9, "%s: both answered 200 (%s / %s); the loser must answer 400" % (name, a.short(), b.short()))

    def a_rawcard(self):
        card = self.rng.choice(RAW_CARDS)
        variant = self.rng.choice(["create_pm", "create_meta", "confirm_pm", "update_meta"])
        marker = "rawcard-%s-%d-%d" % (self.m.run, self.idx, self.nkey)
        with self.m.lock:
            self.m.raw_markers.append((marker, self))
        if variant == "create_pm":
            a = self.send("rawcard create", "POST", "/v1/payment_intents",
                          {"amount": 1234, "currency": "usd", "payment_method": card, "description": marker,
                           "confirm": "true"}, keyed=True, observe=False)
        elif variant == "create_meta":
            a = self.send("rawcard create", "POST", "/v1/payment_intents",
                          {"amount": 1234, "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true",
                           "description": marker, "metadata[card]": card}, keyed=True, observe=False)
        elif variant == "confirm_pm":
            a = self.send("rawcard confirm", "POST", self.path("/confirm"), {"payment_method": card},
                          keyed=True, observe=False)
        else:
            a = self.send("rawcard update", "POST", self.path(), {"metadata[note]": card}, keyed=True,
                          observe=False)
        if a.code is not None and a.code < 500 and a.code != 400:
            self.flag(10, "%s with a raw card number answered %s (must be 400)" % (variant, a.short()))
        self.m.count_step("rawcard:" + variant)

    # ---- refunds ----

    def refund_state(self):
        """What the client knows: (amount still refundable as far as the
        answers tell, the sum of refunds known to have succeeded, {refund
        id: the final status an answer showed})."""
        with self.lock:
            held = succeeded = 0
            finals = {}
            for rid, seen in self.refund_seen.items():
                fin = [st for _, st, _, _ in seen if st in REFUND_FINAL]
                st = fin[-1] if fin else RPENDING
                amount = seen[-1][2] or 0
                if fin:
                    finals[rid] = st
                if st in (RPENDING, RSUCCEEDED):
                    held += amount
                if st == RSUCCEEDED:
                    succeeded += amount
            return (self.received or 0) - held, succeeded, finals

    def pick_reason(self):
        return self.rng.choice(REFUND_REASONS) if self.rng.random() < 0.3 else None

    def partial_amount(self, left):
        return self.rng.randint(1, max(1, left // 2)) if left > 1 else 1

    def refund(self, amount=None, by_charge=False, tag="", fresh=False, key=None, keyed=False, reason=None,
               meta=None, expect=None):
        """POST /v1/refunds (by payment, or by the payment's charge). expect:
        None for a refund that may be made, or the error codes the request
        must be refused with."""
        params = {}
        if by_charge and self.latest_charge:
            params["charge"] = self.latest_charge
        else:
            params["payment_intent"] = self.pid
        if amount is not None:
            params["amount"] = amount
        if reason:
            params["reason"] = reason
        for k, v in (meta or {}).items():
            params["metadata[%s]" % k] = v
        with self.lock:
            first = self.refunds_sent == 0
            self.refunds_sent += 1
        before, received = self.status, self.received
        a = self.send("refund", "POST", "/v1/refunds", params, keyed=keyed, key=key, tag=tag, fresh=fresh,
                      retries=0 if fresh else 4)
        if not a.definite:
            with self.lock:
                self.refund_lost = True
        if a.replayed or not a.definite:
            return a
        r = a.refund
        if expect is not None or before in (RPM, RC, RCAP, CANCELED):
            codes = expect or ("charge_not_refundable",)
            if a.code == 200:
                self.flag(17, "refund %s answered %s although it must be refused (%s; the payment was %s)"
                          % (fmt_params(params), a.short(), "/".join(codes), before))
            elif a.err_code not in codes:
                self.flag(17, "refund %s answered %s, not %s (the payment was %s)"
                          % (fmt_params(params), a.short(), "/".join(codes), before))
            elif a.err_code == "amount_too_large" and (a.obj or {}).get("error", {}).get("param") != "amount":
                self.flag(17, "amount_too_large names param %r, not amount"
                          % (a.obj or {}).get("error", {}).get("param"))
            return a
        if r:
            if amount is not None and r.get("amount") != amount:
                self.flag(17, "refund of %d answered a refund of %s" % (amount, r.get("amount")))
            if r.get("payment_intent") != self.pid or ("charge" in params and r.get("charge") != params["charge"]):
                self.flag(17, "refund %s answered a refund of payment %s, charge %s"
                          % (fmt_params(params), r.get("payment_intent"), r.get("charge")))
            if r.get("status") not in (RPENDING, RSUCCEEDED, RFAILED):
                self.flag(17, "a new refund answered status %s" % r.get("status"))
            if received and (r.get("amount") or 0) > received:
                self.flag(17, "a refund of %s answered 200; the payment received %d" % (r.get("amount"), received))
        elif a.code == 400 and before == SUCCEEDED:
            if a.err_code not in ("amount_too_large", "charge_already_refunded"):
                self.flag(17, "refund %s of a succeeded payment answered %s" % (fmt_params(params), a.short()))
            elif first and not fresh and (amount or 0) <= received:
                self.flag(17, "the first refund (%s) of a payment that received %d was refused: %s"
                          % (fmt_params(params), received, a.short()))
        elif a.code == 404:
            self.flag(17, "refund %s answered 404 for an existing payment" % fmt_params(params))
        return a

    def refund_snapshot(self):
        """(refunds of the payment, amount_refunded + amount_refund_pending)
        in the database, or None."""
        try:
            out = self.m.db.sql("SELECT (SELECT count(*) FROM refunds r WHERE r.payment_intent_id = p.id),"
                                " amount_refunded + amount_refund_pending FROM payment_intents p"
                                " WHERE public_id = '%s'" % self.pid)
            n, held = out.split("|")
            return int(n), int(held)
        except Exception:  # checked only when it can be
            return None

    def refused_changed_nothing(self, what, before, a):
        """A refused refund made no refund and held nothing (with none of
        ours whose answer was lost still possibly on its way)."""
        if before is None or a.code == 200 or self.refund_lost:
            return
        after = self.refund_snapshot()
        if after is None:
            return
        if after[0] != before[0] or after[1] > before[1]:
            self.flag(17, "%s was refused (%s) but the payment's refunds went from %d to %d and what is refunded "
                          "or held from %d to %d" % (what, a.short(), before[0], after[0], before[1], after[1]))

    def a_refund_full(self):
        self.refund(tag="full", keyed=self.rng.random() < 0.85, reason=self.pick_reason())

    def a_refund_partial(self):
        left, _, _ = self.refund_state()
        self.refund(self.partial_amount(left), tag="partial", keyed=self.rng.random() < 0.85,
                    reason=self.pick_reason())

    def a_refund_by_charge(self):
        left, _, _ = self.refund_state()
        amount = None if self.rng.random() < 0.4 else self.partial_amount(left)
        self.refund(amount, by_charge=True, tag="by charge", keyed=self.rng.random() < 0.85,
                    reason=self.pick_reason())

    def a_refund_fail(self):
        left, _, _ = self.refund_state()
        self.refund(self.partial_amount(left), tag="fail=true", keyed=self.rng.random() < 0.85,
                    meta={"fail": "true"})

    def a_refund_too_much(self):
        base = self.received or self.amount or 100
        amount = base + self.rng.randint(1, 1000)
        by_charge = self.rng.random() < 0.3
        before = self.refund_snapshot()
        a = self.refund(amount, by_charge=by_charge, tag="too much", keyed=self.rng.random() < 0.7,
                        expect=("amount_too_large", "charge_already_refunded"))
        self.refused_changed_nothing("a refund of %d (received %d)" % (amount, base), before, a)

    def a_refund_unknown(self):
        """Of a payment or charge that does not exist: 404, nothing made."""
        by_charge = self.rng.random() < 0.5
        params = {"charge": "ch_model_none_%d" % self.idx} if by_charge else \
            {"payment_intent": "pi_model_none_%d" % self.idx}
        a = self.send("refund", "POST", "/v1/refunds", params, keyed=self.rng.random() < 0.5, tag="unknown")
        if a.definite and not a.replayed and (a.code != 404 or a.err_code != "resource_missing"):
            self.flag(17, "refund of %s answered %s, not 404 resource_missing" % (fmt_params(params), a.short()))

    def a_refund_illegal(self):
        """A refund of a payment that did not succeed: charge_not_refundable."""
        by_charge = self.latest_charge is not None and self.rng.random() < 0.4
        amount = None if self.rng.random() < 0.5 else self.rng.randint(1, max(1, self.amount or 100))
        before = self.refund_snapshot()
        a = self.refund(amount, by_charge=by_charge, tag="illegal (%s)" % self.status,
                        keyed=self.rng.random() < 0.7, expect=("charge_not_refundable",))
        self.refused_changed_nothing("a refund of a payment that was %s" % self.status, before, a)

    def a_refund_concurrent(self):
        """2-4 refunds of one payment at once, their sum above what is left:
        what is accepted never exceeds it."""
        left, succeeded, _ = self.refund_state()
        n = self.rng.randint(2, 4)
        low = max(0, left) // n + 1  # n of them at least: more than is left
        amounts = [None if self.rng.random() < 0.15 else self.rng.randint(low, max(low, left * 3 // 4))
                   for _ in range(n)]
        keys = [self.new_key("refund") if self.rng.random() < 0.8 else None for _ in range(n)]
        by_charge = [self.rng.random() < 0.3 for _ in range(n)]
        received = self.received
        results = self.pair("refund x%d" % n, [
            (lambda tag, i=i: self.refund(amounts[i], by_charge=by_charge[i], tag=tag, fresh=True, key=keys[i]))
            for i in range(n)])
        accepted = [a.refund for a in results if a is not None and a.refund and not a.replayed
                    and a.refund.get("status") in (RPENDING, RSUCCEEDED)]
        total = sum(r.get("amount") or 0 for r in accepted)
        if received and total > received - succeeded:
            self.flag(17, "%d concurrent refunds accepted %d in all (%s); the payment received %d and %d of it "
                          "was refunded before" % (len(accepted), total, ", ".join(
                              "%s %s" % (r.get("id"), r.get("amount")) for r in accepted), received, succeeded))

    def a_refund_same_key(self):
        """The same refund twice at once under one key: one refund."""
        left, _, _ = self.refund_state()
        amount = self.partial_amount(left)
        key = self.new_key("refund")
        a, b = self.pair("refund same key twice", [
            lambda tag: self.refund(amount, tag=tag, fresh=True, key=key),
            lambda tag: self.refund(amount, tag=tag, fresh=True, key=key)])
        if a and b:
            self.resends.append(("refund", key, a, b, "concurrent"))
            if a.refund and b.refund and a.refund.get("id") != b.refund.get("id"):
                self.flag(8, "one refund twice at once under key %s made two refunds: %s and %s"
                          % (key, a.refund.get("id"), b.refund.get("id")))

    def refund_cancel(self, rid, tag="", final=None, key=None, keyed=None, fresh=False):
        """POST /v1/refunds/:id/cancel; final: the status an answer showed
        it in (then it must be refused)."""
        if keyed is None and key is None:
            keyed = self.rng.random() < 0.7
        a = self.send("refund cancel", "POST", "/v1/refunds/%s/cancel" % rid, {}, keyed=keyed, key=key, tag=tag,
                      fresh=fresh, retries=0 if fresh else 4)
        if a.replayed or not a.definite:
            return a
        if final:
            if a.code != 400 or a.err_code != "refund_not_cancelable":
                self.flag(17, "cancel of refund %s, which an answer showed %s, answered %s (must be 400 "
                              "refund_not_cancelable)" % (rid, final, a.short()))
        elif a.code == 200:
            if not a.refund or a.refund.get("id") != rid:
                self.flag(17, "cancel of refund %s answered %s" % (rid, a.short()))
        elif a.code != 400 or a.err_code != "refund_not_cancelable":
            self.flag(17, "cancel of refund %s answered %s" % (rid, a.short()))
        return a

    def a_refund_then_cancel(self):
        """A refund, then its cancel: while the gateway holds it pending
        (async refunds) it may be canceled; a final one may not."""
        left, _, _ = self.refund_state()
        a = self.refund(self.partial_amount(left), tag="then cancel", keyed=self.rng.random() < 0.85)
        r = a.refund
        if not r or a.replayed:
            return
        if r.get("status") == RPENDING:
            # At once, or about when the gateway settles it (its callback
            # delay): the cancel races the settlement and its callback.
            late = self.rng.random() < 0.4
            time.sleep(self.rng.uniform(0.45, 0.95) if late else self.rng.uniform(0, 0.15))
            self.refund_cancel(r["id"], tag="while pending" + (", late" if late else ""))
        else:
            self.refund_cancel(r["id"], tag="after %s" % r.get("status"), final=r.get("status"))

    def a_refund_cancel_twice(self):
        """Two cancels of one pending refund at once: at most one is taken."""
        left, _, _ = self.refund_state()
        a = self.refund(self.partial_amount(left), tag="then cancel twice", keyed=self.rng.random() < 0.85)
        r = a.refund
        if not r or a.replayed or r.get("status") != RPENDING:
            return
        rid = r["id"]
        keys = [self.new_key("refund_cancel") if self.rng.random() < 0.7 else None for _ in range(2)]
        x, y = self.pair("refund cancel||cancel", [
            lambda tag: self.refund_cancel(rid, tag=tag, key=keys[0], keyed=False, fresh=True),
            lambda tag: self.refund_cancel(rid, tag=tag, key=keys[1], keyed=False, fresh=True)])
        if x and y and x.code == 200 and y.code == 200 and not x.replayed and not y.replayed:
            self.flag(17, "two concurrent cancels of refund %s both answered 200 (%s / %s)" % (rid, x.short(),
                                                                                           y.short()))

    def a_refund_cancel_final(self):
        _, _, finals = self.refund_state()
        if not finals:
            return self.a_refund_read()
        rid = self.rng.choice(sorted(finals))
        self.refund_cancel(rid, tag="of a %s refund" % finals[rid], final=finals[rid])

    def a_refund_resend(self):
        mine = [k for k in self.keyed if k[0].startswith("refund")]
        if not mine:
            return self.a_refund_read()
        op, method, path, params, key, first = self.rng.choice(mine)
        a = self.send(op, method, path, params, key=key, retries=0, tag="re-send of %s" % key)
        self.resends.append((op, key, first, a, "re-send"))
        self.m.count_step("resend:" + op)

    def check_charge_view(self, ch, op):
        """A charge as the API shows it adds up with its refunds."""
        refs = (ch.get("refunds") or {}).get("data") or []
        succ = sum(r.get("amount") or 0 for r in refs if r.get("status") == RSUCCEEDED)
        captured, refunded = ch.get("amount_captured") or 0, ch.get("amount_refunded")
        if refunded != succ or refunded > captured or \
                bool(ch.get("refunded")) != (captured > 0 and refunded >= captured):
            self.flag(17, "%s: charge %s shows amount_captured %s, amount_refunded %s, refunded %s, succeeded "
                          "refunds %d" % (op, ch.get("id"), captured, refunded, ch.get("refunded"), succ))

    def a_refund_read(self):
        with self.lock:
            known = sorted(rid for rid, seen in self.refund_seen.items()
                           if any(op == "refund" and not rep for op, _, _, rep in seen))
        what = self.rng.choice(["retrieve", "list", "list by charge", "charge", "charges"])
        if what == "retrieve" and known:
            rid = self.rng.choice(known)
            a = self.send("refund retrieve", "GET", "/v1/refunds/" + rid, None, keyed=False)
            if a.definite and not a.refund:
                self.flag(17, "GET /v1/refunds/%s answered %s" % (rid, a.short()))
        elif what in ("list", "list by charge", "retrieve"):
            params = {"limit": 100}
            if what == "list by charge" and self.latest_charge:
                params["charge"] = self.latest_charge
            else:
                params["payment_intent"] = self.pid
            a = self.send("refund list", "GET", "/v1/refunds", params, keyed=False)
            if a.code == 200:
                listed = {x.get("id") for x in a.refunds_shown()}
                missing = [rid for rid in known if rid not in listed]
                if missing:
                    self.flag(15, "refunds answered 200 are missing from GET /v1/refunds?%s: %s"
                              % (fmt_params(params), ", ".join(missing)))
        elif what == "charge" and self.latest_charge:
            a = self.send("charge retrieve", "GET", "/v1/charges/" + self.latest_charge, None, keyed=False)
            if a.code == 200:
                self.check_charge_view(a.obj, "GET /v1/charges/:id")
        else:
            a = self.send("charge list", "GET", "/v1/charges", {"payment_intent": self.pid}, keyed=False)
            if a.code == 200:
                for ch in (a.obj or {}).get("data") or []:
                    self.check_charge_view(ch, "GET /v1/charges?payment_intent=")

    def a_refund_update(self):
        with self.lock:
            known = sorted(self.refund_seen)
        if not known:
            return self.a_refund_read()
        rid = self.rng.choice(known)
        params = {"metadata[note]": "n%d" % self.rng.randint(0, 999)}
        a = self.send("refund update", "POST", "/v1/refunds/" + rid, params, keyed=self.rng.random() < 0.5)
        if a.definite and not a.replayed and (not a.refund or (a.refund.get("metadata") or {}).get("note")
                                              != params["metadata[note]"]):
            self.flag(17, "metadata update of refund %s answered %s" % (rid, a.short()))


# -------------------------------------------------------------- the model --

class Model:
    def __init__(self, opts):
        self.opts = opts
        self.seed = opts.seed
        self.run = "m%x" % (int(time.time() * 1000) % (1 << 32))
        self.lock = threading.Lock()
        self.by_pid = {}
        self.raw_markers = []
        self.ops = collections.Counter()
        self.steps = collections.Counter()
        self.codes = collections.Counter()
        self.requests = 0
        self.faults_log = []
        self.kills = collections.Counter()
        self.refunds = True          # this build has refunds (the refunds table)
        self.refund_phases = []      # (seconds since the drive began, gatewaysim's refund settings)

    def count(self, op, a):
        with self.lock:
            self.ops[op] += 1
            self.codes[a.code if a.code is not None else "no answer"] += 1
            self.requests += 1

    def count_step(self, name):
        with self.lock:
            self.steps[name] += 1

    # ---- scheduling ----

    def drive(self, programs):
        """Runs every program's steps on CLIENTS threads; a pause holds no thread."""
        heap = []
        seq = itertools.count()
        ramp = max(5.0, len(programs) / 10.0)
        srng = random.Random("%d:start" % self.seed)
        now = time.monotonic()
        for p in programs:
            heapq.heappush(heap, (now + srng.uniform(0, ramp), next(seq), p))
        cv = threading.Condition()
        state = {"active": len(programs), "done": 0}

        def client():
            while True:
                with cv:
                    while True:
                        if not heap:
                            if state["active"] == 0:
                                return
                            cv.wait(0.5)
                            continue
                        due = heap[0][0]
                        t = time.monotonic()
                        if due <= t:
                            _, _, prog = heapq.heappop(heap)
                            break
                        cv.wait(min(0.5, due - t))
                try:
                    delay = prog.step()
                except Exception as e:  # a bug of the checker: report it with the payment
                    prog.note("checker error: %s" % traceback.format_exc())
                    print("checker error in program %d: %r" % (prog.idx, e), flush=True)
                    delay = None
                with cv:
                    if delay is None:
                        state["active"] -= 1
                        state["done"] += 1
                    else:
                        heapq.heappush(heap, (time.monotonic() + delay, next(seq), prog))
                    cv.notify_all()

        threads = [threading.Thread(target=client, name="c%02d" % i, daemon=True)
                   for i in range(self.opts.clients)]
        for t in threads:
            t.start()
        last = time.monotonic()
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                with cv:
                    done, waiting = state["done"], len(heap)
                log("programs: %d/%d finished, %d waiting, %d requests" % (done, len(programs), waiting,
                                                                           self.requests))
        for t in threads:
            t.join()

    # ---- faults ----

    def faults(self, pd, stop):
        rng = random.Random("%d:faults" % self.seed)
        start = time.monotonic()
        ramp = max(5.0, self.opts.n / 10.0)
        api_kills = sorted(rng.uniform(3, ramp + 3) for _ in range(rng.choice([1, 2]))) if self.opts.kills else []
        next_worker = rng.uniform(2, 4)
        while not stop.wait(0.2):
            t = time.monotonic() - start
            role = None
            if self.opts.kills and t >= next_worker:
                role, next_worker = "worker", next_worker + rng.uniform(3, 6)
            elif api_kills and t >= api_kills[0]:
                role = "api"
                api_kills.pop(0)
            if not role:
                continue
            try:
                victims = [r for r in pd.status() if r["role"] == role and r["pid"]]
                if victims:
                    v = rng.choice(victims)
                    os.kill(v["pid"], signal.SIGKILL)
                    self.kills[role] += 1
                    log("fault: kill -9 %s/%d (pid %d)" % (role, v["index"], v["pid"]))
            except (AssertionError, OSError) as e:
                log("fault: could not kill a %s: %s" % (role, e))


    # ---- refund phases ----

    def refund_modes(self, gw, stop):
        """Switches gatewaysim's refunds every REFUND_PHASE_S: answered at
        once or pending until they settle (async_refund), with or without a
        share failing (refund_fail_rate), as far as the options leave open."""
        o = self.opts
        start = time.monotonic()
        i = 0
        while True:
            cfg = {}
            if o.async_refund is None:
                cfg["async_refund"] = i % 2 == 1
            if o.refund_fail_rate is None:
                cfg["refund_fail_rate"] = 25 if (i // 2) % 2 == 1 else 0
            if not cfg:
                return
            try:
                code, _ = gw.configure(**cfg)
                if code == 200:
                    self.refund_phases.append((round(time.monotonic() - start, 1), cfg))
            except (OSError, http.client.HTTPException, ValueError) as e:
                log("refund phase: gatewaysim did not take %s: %s" % (cfg, e))
            i += 1
            if stop.wait(REFUND_PHASE_S):
                return


# ----------------------------------------------------------------- checks --

def ledger_amount_authorized(ch):
    v = ch.get("amount_authorized")
    if v is None:
        return ch.get("amount", 0) if ch.get("status") == RCAP else 0
    return v


def check_payment(row, prog, charges, events, txns, rows_for_idx):
    """Returns [(rule, message)] for one payment (row: its payment_intents
    columns, None when the create made none)."""
    out = []
    if row is None:
        if charges:
            out.append((1, "the gateway holds %d charge(s) for a payment that does not exist" % len(charges)))
        return out
    pid, status = row["id"], row["status"]
    received, refunded = row["amount_received"], row["amount_refunded"]
    capturable = row["amount_capturable"]

    # 1 money
    gw_net = sum((c.get("amount_captured") or 0) - (c.get("amount_refunded") or 0) for c in charges)
    if gw_net != received - refunded:
        out.append((1, "the gateway holds %d (captured - refunded over %d charge(s)), the payment says "
                       "amount_received %d - amount_refunded %d = %d (status %s)"
                    % (gw_net, len(charges), received, refunded, received - refunded, status)))
    captured = [c for c in charges if (c.get("amount_captured") or 0) > 0]
    # 2 captured on canceled / failed
    if status in (CANCELED, RPM, RC) and captured:
        out.append((2, "%d charge(s) with captured money (%s) on a payment that ended %s"
                    % (len(captured), ", ".join("%s %s" % (c["id"], c.get("amount_captured")) for c in captured),
                       status)))
    # 3 authorization
    auths = [c for c in charges if c.get("status") == RCAP]
    if status == RCAP:
        if len(auths) != 1:
            out.append((3, "requires_capture but %d open authorization(s) at the gateway" % len(auths)))
        elif ledger_amount_authorized(auths[0]) != capturable:
            out.append((3, "authorization %s holds %s, amount_capturable is %s"
                        % (auths[0]["id"], ledger_amount_authorized(auths[0]), capturable)))
    elif auths and status != CANCELED:
        out.append((3, "%d open authorization(s) (%s) at the gateway on a payment that ended %s"
                    % (len(auths), ", ".join(c["id"] for c in auths), status)))
    # 4 open charges
    pending3ds = [c for c in charges if c.get("status") == RA]
    if status == CANCELED and (auths or pending3ds):
        out.append((4, "canceled, but the gateway still holds %s"
                    % ", ".join("%s (%s)" % (c["id"], c["status"]) for c in auths + pending3ds)))
    if len(pending3ds) > 1:
        out.append((4, "%d charges in requires_action at the gateway (%s)"
                    % (len(pending3ds), ", ".join(c["id"] for c in pending3ds))))
    elif pending3ds and status not in (RA, CANCELED):
        out.append((4, "charge %s is requires_action at the gateway, the payment ended %s"
                    % (pending3ds[0]["id"], status)))
    # 5 double charge
    if len(captured) > 1:
        out.append((5, "%d charges with captured money: %s"
                    % (len(captured), ", ".join("%s %s" % (c["id"], c.get("amount_captured")) for c in captured))))
    if (status == SUCCEEDED) != (received > 0):
        out.append((5, "status %s with amount_received %d" % (status, received)))
    # 6 stuck
    if status == PROCESSING:
        out.append((6, "still processing after the quiet period"))
    pend = [t for t in txns if t.get("status") == "pending"]
    if pend:
        out.append((6, "%d payment_transactions still pending" % len(pend)))
    gw_pend = [c for c in charges if c.get("status") == "pending"]
    if gw_pend:
        out.append((6, "charge(s) %s still pending at the gateway" % ", ".join(c["id"] for c in gw_pend)))
    # 7 events
    types = [e["type"] for e in events]
    if not types or types[0] != EV + "created":
        out.append((7, "the first event is %s, not payment_intent.created" % (types[0] if types else "missing")))
    if types.count(EV + "created") > 1:
        out.append((7, "%d payment_intent.created events" % types.count(EV + "created")))
    for t in sorted(set(types) - EVENT_TYPES):
        out.append((7, "unexpected event type %s" % t))
    for final, etype in ((SUCCEEDED, EV + "succeeded"), (CANCELED, EV + "canceled")):
        want = 1 if status == final else 0
        if types.count(etype) != want:
            out.append((7, "%d %s event(s) for a payment that ended %s" % (types.count(etype), etype, status)))
    ends = [i for i, t in enumerate(types) if t in (EV + "succeeded", EV + "canceled")]
    if ends and ends[0] != len(types) - 1:
        out.append((7, "events after %s: %s" % (types[ends[0]], types[ends[0] + 1:])))
    if types and status in LAST_EVENT and types[-1] not in LAST_EVENT[status]:
        out.append((7, "the last event is %s, the payment ended %s" % (types[-1], status)))
    # Answers about this payment (a raw card create may have made another one).
    answers = [(op, a) for op, a in prog.answers if a.pi is None or a.pi.get("id") == pid] \
        if prog is not None else []
    if prog is not None:
        shown = set()
        for op, a in answers:
            if a.code == 402:
                shown.add(EV + "payment_failed")
            elif a.code == 200 and not a.replayed and a.status in STATE_EVENT:
                shown.add(STATE_EVENT[a.status])
        for etype in sorted(shown - set(types)):
            out.append((7, "an answer showed the state of %s, but there is no such event" % etype))
    # 8 idempotency (create)
    if prog is not None and prog.created_keyed and rows_for_idx > 1:
        out.append((8, "one create under one Idempotency-Key made %d payments" % rows_for_idx))
    # 11 terminal states stay
    if prog is not None:
        for op, a in answers:
            if a.status in TERMINAL and a.status != status and a.code in (200, 402):
                out.append((11, "%s answered %s, the payment ended %s" % (op, a.short(), status)))
                break
    # 12 expiry
    if row.get("past_expiry") and status in (RPM, RC, RA, RCAP):
        out.append((12, "%s past expires_at (%s) and not canceled" % (status, row.get("expires_at"))))
    return out


def check_refunds(row, prog, charges, refund_rows, revents):
    """Rules 13-16 for one payment: its refunds in the database, at the
    gateway (the refunds of its charges in the ledger), in the answers and
    in the outbox."""
    out = []
    received, refunded = row["amount_received"] or 0, row["amount_refunded"] or 0
    held = row.get("amount_refund_pending") or 0
    gw_refunds = [x for c in charges for x in c.get("refunds") or []]
    # 13 money
    gw_succ = sum(x.get("amount") or 0 for x in gw_refunds if x.get("status") == RSUCCEEDED)
    gw_charge_refunded = sum(c.get("amount_refunded") or 0 for c in charges)
    db_succ = sum(r["amount"] for r in refund_rows if r["status"] == RSUCCEEDED)
    if not gw_succ == gw_charge_refunded == db_succ == refunded:
        out.append((13, "refunded: %d by the gateway's succeeded refunds (its charges' amount_refunded %d), %d by "
                        "the succeeded refunds in the refunds table, amount_refunded %d"
                    % (gw_succ, gw_charge_refunded, db_succ, refunded)))
    if refunded > received or gw_succ > received:
        out.append((13, "refunded %d (gateway %d) of amount_received %d" % (refunded, gw_succ, received)))
    for c in charges:
        if (c.get("amount_refunded") or 0) > (c.get("amount_captured") or 0):
            out.append((13, "charge %s: refunded %s of %s captured" % (c["id"], c.get("amount_refunded"),
                                                                      c.get("amount_captured"))))
    # 14 stuck
    if held:
        out.append((14, "amount_refund_pending %d after the quiet period" % held))
    pend = [r["id"] for r in refund_rows if r["status"] == RPENDING]
    if pend:
        out.append((14, "refund(s) %s still pending" % ", ".join(pend)))
    gw_pend = [x.get("id") for x in gw_refunds if x.get("status") == RPENDING]
    if gw_pend:
        out.append((14, "refund(s) %s still pending at the gateway" % ", ".join(gw_pend)))
    # 15 the database's refunds and the gateway's
    by_key = collections.defaultdict(list)
    for x in gw_refunds:
        by_key[x.get("idempotency_key")].append(x)
    rows_by_id = {r["id"]: r for r in refund_rows}
    for r in refund_rows:
        g = by_key.get(r["key"], [])
        if len(g) > 1:
            out.append((15, "refund %s: %d gateway refunds under its key %s (%s)"
                        % (r["id"], len(g), r["key"], ", ".join("%s %s" % (x.get("id"), x.get("status")) for x in g))))
            continue
        gst = g[0].get("status") if g else None
        fine = {RSUCCEEDED: (RSUCCEEDED,), RFAILED: (None, RFAILED), RCANCELED: (RCANCELED,),
                RPENDING: (None, RPENDING)}.get(r["status"], ())
        if gst not in fine:
            out.append((15, "refund %s (%d) is %s, its gateway refund %s" % (
                r["id"], r["amount"], r["status"], "%s is %s" % (g[0].get("id"), gst) if g else "does not exist")))
        elif g and g[0].get("amount") != r["amount"]:
            out.append((15, "refund %s of %d, its gateway refund %s of %s" % (r["id"], r["amount"], g[0].get("id"),
                                                                            g[0].get("amount"))))
    for k, g in by_key.items():
        if k not in {r["key"] for r in refund_rows}:
            out.append((15, "gateway refund(s) %s under key %s, which is no refund of the payment"
                        % (", ".join("%s %s %s" % (x.get("id"), x.get("amount"), x.get("status")) for x in g), k)))
    if prog is not None:
        with prog.lock:
            seen = {rid: list(v) for rid, v in prog.refund_seen.items()}
        for rid, answers in seen.items():
            r = rows_by_id.get(rid)
            if r is None:
                out.append((15, "refund %s answered 2xx (%s) is not in the refunds table"
                            % (rid, ", ".join("%s: %s" % (op, st) for op, st, _, _ in answers[:3]))))
                continue
            finals = []
            for op, st, amount, _ in answers:
                if st in REFUND_FINAL and st not in finals:
                    finals.append(st)
                if amount != r["amount"]:
                    out.append((15, "%s answered refund %s of %s, it is of %d" % (op, rid, amount, r["amount"])))
                    break
            if len(finals) > 1 or (finals and r["status"] != finals[0]):
                out.append((15, "answers showed refund %s %s, it ended %s" % (rid, " then ".join(finals), r["status"])))
    # 16 events
    for r in refund_rows:
        mine = [e for e in revents if e["oid"] == r["id"]]
        created = [e for e in mine if e["type"] == "refund.created"]
        ends = [e for e in mine if e["type"] in ("refund.updated", "refund.failed")]
        if len(created) != 1:
            out.append((16, "refund %s has %d refund.created events" % (r["id"], len(created))))
        want = REFUND_FINAL_EVENT.get(r["status"])
        if want is None:
            if ends:
                out.append((16, "refund %s is %s but has %s" % (r["id"], r["status"], [e["type"] for e in ends])))
        elif len(ends) != 1 or ends[0]["type"] != want or ends[0]["status"] != r["status"]:
            out.append((16, "refund %s ended %s; its events after refund.created: %s (want one %s %s)"
                        % (r["id"], r["status"], ["%s %s" % (e["type"], e["status"]) for e in ends], want,
                           r["status"])))
        elif created and ends[0]["id"] < created[0]["id"]:
            out.append((16, "refund %s: %s before refund.created" % (r["id"], ends[0]["type"])))
    n_succ = sum(1 for r in refund_rows if r["status"] == RSUCCEEDED)
    n_cr = sum(1 for e in revents if e["type"] == "charge.refunded")
    if n_cr != n_succ:
        out.append((16, "%d charge.refunded events for %d succeeded refunds" % (n_cr, n_succ)))
    strays = sorted({e["oid"] for e in revents if e["type"] != "charge.refunded" and e["oid"] not in rows_by_id})
    if strays:
        out.append((16, "refund events for refunds that are not the payment's: %s" % ", ".join(map(str, strays))))
    return out


# Idempotent answers are stored only once a request executed: refusals at
# validation (parameter_missing, amount_too_large, ...) keep none, like Stripe.
STORED_400 = ("payment_intent_unexpected_state",)


def check_resends(prog):
    out = []
    for op, key, first, second, how in prog.resends:
        if first is None or second is None:
            continue
        if not first.definite or not second.definite:
            continue
        if first.code == 400 and first.err_code not in STORED_400:
            continue
        if first.code == 404 or second.code == 404:
            continue
        if first.code != second.code or first.body != second.body:
            out.append((8, "%s %s under key %s: first %s, then %s%s"
                        % (how, op, key, first.short(), second.short(),
                           "" if first.code != second.code else " (bodies differ)")))
    return out


# ------------------------------------------------------------------ report --

def fmt_params(p):
    if not p:
        return ""
    return " ".join("%s=%s" % (k, v) for k, v in p.items())


def story(prog):
    lines = []
    if prog is None:
        return ["    (no program: not created by the checker's own requests)"]
    with prog.lock:
        hist = list(prog.history)
    lines.append("    program #%d, %d steps, capture_method %s" % (prog.idx, prog.steps_total, prog.capture_method))
    for e in hist:
        a = e["answer"]
        if a is None:
            lines.append("    %8.3fs %-10s -- %s" % (e["t"], e["thread"], e["op"]))
            continue
        lines.append("    %8.3fs %-10s %-8s %s%s%s -> %s  (%.0f ms)"
                     % (e["t"], e["thread"], e["op"], fmt_params(e["params"]),
                        " key=" + e["key"] if e["key"] else "", " [%s]" % e["tag"] if e["tag"] else "",
                        a.short(), a.latency * 1000))
    return lines


def details(pid, prog, row, txns, events, callbacks, charges, logs, refunds=(), refund_events=()):
    out = ["  story:"] + story(prog)
    out.append("  payment_intents: %s" % (json.dumps(row["row"], sort_keys=True) if row else "(none)"))
    out.append("  payment_transactions (%d):" % len(txns))
    out += ["    %s" % json.dumps(t, sort_keys=True) for t in txns]
    out.append("  outbox events: %s" % [e["type"] for e in events])
    out.append("  refunds (%d):" % len(refunds))
    out += ["    %s" % json.dumps(dict(r["row"], attempt_key=r["key"], attempt_status=r["attempt_status"],
                                       gateway_refund=r["gateway_id"], charge=r["charge"]), sort_keys=True)
            for r in refunds]
    out.append("  refund events: %s" % ["%s %s %s" % (e["type"], e["oid"], e["status"]) for e in refund_events])
    if prog is not None and prog.refund_seen:
        with prog.lock:
            seen = {rid: list(v) for rid, v in prog.refund_seen.items()}
        out.append("  refunds as the answers showed them:")
        out += ["    %s: %s" % (rid, ", ".join("%s %s %s%s" % (op, amount, st, " [replayed]" if rep else "")
                                             for op, st, amount, rep in v)) for rid, v in seen.items()]
    gw_refunds = [x for c in charges for x in c.get("refunds") or []]
    out.append("  ledger refunds (%d):" % len(gw_refunds))
    out += ["    %s" % json.dumps(x, sort_keys=True) for x in gw_refunds]
    out.append("  gateway_events (%d):" % len(callbacks))
    out += ["    %s" % json.dumps(c, sort_keys=True) for c in callbacks]
    out.append("  ledger charges (%d):" % len(charges))
    out += ["    %s" % json.dumps(c, sort_keys=True) for c in charges]
    mine = [line for line in logs if pid and pid in line]
    if mine:
        out.append("  paymentd log lines (%d, last 25):" % len(mine))
        out += ["    " + line[:400] for line in mine[-25:]]
    return out


# -------------------------------------------------------------------- main --

def options():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=env_int("MODEL_SEED", 0) or random.SystemRandom().randrange(1, 1 << 31))
    ap.add_argument("--n", type=int, default=env_int("MODEL_N", 0))
    ap.add_argument("--clients", type=int, default=env_int("MODEL_CLIENTS", 16))
    ap.add_argument("--kills", type=int, default=env_int("MODEL_KILLS", 1))
    ap.add_argument("--timeout-rate", type=int, default=env_int("MODEL_TIMEOUT_RATE", 3))
    ap.add_argument("--async-capture", type=int, default=env_int("MODEL_ASYNC_CAPTURE", 0))
    ap.add_argument("--async-refund", type=int, default=env_opt_int("MODEL_ASYNC_REFUND"))
    ap.add_argument("--refund-fail-rate", type=int, default=env_opt_int("MODEL_REFUND_FAIL_RATE"))
    ap.add_argument("--details", type=int, default=env_int("MODEL_DETAILS", 3))
    ap.add_argument("--report", default=os.environ.get("MODEL_REPORT"))
    ap.add_argument("--self-test", action="store_true", help="inject one bookkeeping error; pass only if caught")
    o = ap.parse_args()
    if not o.n:
        o.n = 40 if o.self_test else 300
    return o


def reproduce(o):
    cmd = "MODEL_SEED=%d MODEL_N=%d" % (o.seed, o.n)
    for name, value, default in (("MODEL_CLIENTS", o.clients, 16), ("MODEL_KILLS", o.kills, 1),
                                 ("MODEL_TIMEOUT_RATE", o.timeout_rate, 3),
                                 ("MODEL_ASYNC_CAPTURE", o.async_capture, 0),
                                 ("MODEL_ASYNC_REFUND", o.async_refund, None),
                                 ("MODEL_REFUND_FAIL_RATE", o.refund_fail_rate, None)):
        if value != default:
            cmd += " %s=%d" % (name, value)
    return cmd + " python3 tests/model/model.py" + (" --self-test" if o.self_test else "")


CALLBACK_SECRET = "whsec_model_checker_callbacks_0123456789"
CALLBACK_DELAY_MS, CALLBACK_JITTER_MS, CALLBACK_DUPLICATES = 700, 800, 20
REFUND_PHASE_S = 4.0


def settle(model, db, gw, account_id, pd, limit_s=90):
    """The quiet period: until no payment is processing, nothing is pending
    and neither the database nor the ledger changed for a while."""
    window = (CALLBACK_DELAY_MS + CALLBACK_JITTER_MS) / 1000.0 + 3.0
    start = time.monotonic()
    last, stable_since, why = None, time.monotonic(), "?"
    while time.monotonic() - start < limit_s:
        if gw.proc.poll() is not None:
            raise RuntimeError("gatewaysim exited with %s" % gw.proc.poll())
        try:
            refunds = ("(SELECT count(*) || ':' || md5(coalesce(string_agg(public_id || ':' || status, ','"
                       " ORDER BY id), '')) FROM refunds WHERE account_id = %s AND status = 'pending'),"
                       " (SELECT md5(coalesce(string_agg(public_id || ':' || status, ',' ORDER BY id), ''))"
                       " FROM refunds WHERE account_id = %s)," % (account_id, account_id)) \
                if model.refunds else "'0:', '',"
            rows = db.sql("SELECT count(*) FILTER (WHERE status = 'processing'),"
                          " md5(coalesce(string_agg(public_id || ':' || status || ':' || version, ','"
                          "  ORDER BY id), '')), " + refunds +
                          " (SELECT count(*) FROM payment_transactions t JOIN payment_intents q"
                          "  ON q.id = t.payment_intent_id WHERE q.account_id = %s AND t.status = 'pending')"
                          " FROM payment_intents WHERE account_id = %s" % (account_id, account_id)).split("|")
            ledger = gw.ledger()
        except Exception as e:  # a restarting role or database: keep waiting
            why = str(e)
            time.sleep(1)
            continue
        processing, fp_db, refunds_pending, fp_refunds, pending = \
            int(rows[0]), rows[1], int(rows[2].split(":")[0]), rows[3], int(rows[4])
        gw_pending = sum(1 for c in ledger.get("data", []) if c.get("status") == "pending")
        gw_refunds_pending = sum(1 for c in ledger.get("data", []) for r in c.get("refunds") or []
                                 if r.get("status") == "pending")
        fp = (fp_db, fp_refunds, hashlib.md5(json.dumps(ledger, sort_keys=True).encode()).hexdigest())
        if fp != last:
            last, stable_since = fp, time.monotonic()
        why = ("%d processing, %d attempts pending, %d refunds pending, %d gateway charges and %d gateway refunds"
               " pending, stable for %.1f s" % (processing, pending, refunds_pending, gw_pending, gw_refunds_pending,
                                                time.monotonic() - stable_since))
        if processing == 0 and pending == 0 and gw_pending == 0 and refunds_pending == 0 and \
                gw_refunds_pending == 0 and time.monotonic() - stable_since >= window:
            return True, time.monotonic() - start, why
        time.sleep(1)
    return False, time.monotonic() - start, why


def main():
    o = options()
    started = time.monotonic()
    print("model checker: seed %d, %d payments, %d clients, kills %d, gateway timeouts %d %%, async capture %d"
          % (o.seed, o.n, o.clients, o.kills, o.timeout_rate, o.async_capture))
    print("reproduce with: %s" % reproduce(o), flush=True)
    base = os.environ.get("PAYMENTD_TEST_TMP") or tempfile.gettempdir()
    db = Servers(base)
    os.environ["POSTGRES_PORT"] = str(db.pg_port)
    os.environ["REDIS_PORT"] = str(db.redis_port)
    os.environ.setdefault("POSTGRES_HOST", "127.0.0.1")
    cleanup = [db.close]
    try:
        return run(o, db, cleanup, started)
    except Exception:
        # Whatever broke the run itself: say what the servers said.
        if "gw" in RUN:
            g = RUN["gw"]
            print("gatewaysim %s; its log ends:\n%s" % (
                "exited with %s" % g.proc.poll() if g.proc.poll() is not None else "is running", g.tail()))
        if "pd" in RUN:
            print("paymentd's log ends:\n%s" % RUN["pd"].logs(4000))
        raise
    finally:
        for f in cleanup:
            try:
                f()
            except Exception as e:  # keep tearing down
                print("teardown:", e)


RUN = {}


def run(o, db, cleanup, started):
    ctl = lambda *a: subprocess.run([os.path.join(BIN, "paymentctl")] + list(a), check=True,
                                    capture_output=True, text=True).stdout.strip()
    ctl("migrate")
    account = ctl("create-account", "model")
    key = ctl("create-key", account)
    account_id = db.sql("SELECT id FROM accounts WHERE public_id = '%s'" % account)
    # Short timeouts for a test; PROCESSING_LEASE_MS is left to be derived from them.
    pd = Paymentd(API_PROCESSES=2, WORKERS=2, GATEWAY_TIMEOUT_MS=1000, GATEWAY_MAX_ATTEMPTS=3,
                  GATEWAY_RETRY_CAP_MS=300, DB_STATEMENT_TIMEOUT_MS=2000, SWEEP_INTERVAL_MS=300,
                  CONFIRM_WAIT_MS=3000, BREAKER_OPEN_MS=1000, OUTBOX_POLL_MS=200, DB_QUEUE_TIMEOUT_MS=1000,
                  RESTART_INTENSITY=100, GATEWAY_WEBHOOK_SECRET=CALLBACK_SECRET,
                  RATE_LIMIT_CALLBACKS=1000000)
    if os.environ.get("MODEL_PROCESSING_LEASE_MS"):
        pd.env["PROCESSING_LEASE_MS"] = os.environ["MODEL_PROCESSING_LEASE_MS"]
    cleanup.insert(0, pd.cleanup)
    RUN["pd"] = pd
    flags = [("--latency-ms", 20),
             ("--callback-url", "http://127.0.0.1:%d/v1/gateway_webhooks/sim" % pd.port),
             ("--callback-secret", CALLBACK_SECRET), ("--callback-delay-ms", CALLBACK_DELAY_MS),
             ("--callback-jitter-ms", CALLBACK_JITTER_MS), ("--callback-duplicate-rate", CALLBACK_DUPLICATES)]
    if o.async_capture:
        flags.append(("--async-capture", None))
    if o.async_refund:
        flags.append(("--async-refund", None))
    if o.refund_fail_rate is not None:
        flags.append(("--refund-fail-rate", o.refund_fail_rate))
    gw = Gateway(flags, db.dir)
    cleanup.insert(0, gw.stop)
    RUN["gw"] = gw
    if gw.unsupported:
        log("WARNING: this gatewaysim does not know %s; running without" % ", ".join(gw.unsupported))
    pd.env["GATEWAY_URL"] = gw.url
    pd.start()
    wait_for(lambda: pd.json("/readyz")[0] == 200, 60, what="paymentd ready")
    log("paymentd on port %d, gatewaysim on %d" % (pd.port, gw.port))

    model = Model(o)
    model.api = Api(pd.port, key)
    model.db = db
    model.refunds = db.sql("SELECT to_regclass('refunds') IS NOT NULL") == "t"
    if not model.refunds:
        log("WARNING: this build has no refunds table; running without refunds")
    programs = [Pay(model, i) for i in range(o.n)]
    if o.timeout_rate:
        gw.configure(timeout_rate=o.timeout_rate)
    stop = threading.Event()
    fault_thread = threading.Thread(target=model.faults, args=(pd, stop), daemon=True)
    fault_thread.start()
    phase_thread = threading.Thread(target=model.refund_modes, args=(gw, stop), daemon=True)
    if model.refunds:
        phase_thread.start()
    log("driving %d payments (%d steps in all) on %d threads" % (o.n, sum(p.steps_total for p in programs),
                                                                o.clients))
    drive_start = time.monotonic()
    model.drive(programs)
    drive_s = time.monotonic() - drive_start
    stop.set()
    fault_thread.join()
    if phase_thread.is_alive():
        phase_thread.join()
    log("programs done in %.1f s: %d requests; faults stopped (%s)"
        % (drive_s, model.requests, ", ".join("%d %s killed" % (n, r) for r, n in model.kills.items()) or "no kills"))
    if gw.proc.poll() is not None:
        raise RuntimeError("gatewaysim exited with %s during the run: nothing can be checked" % gw.proc.poll())
    wait_for(lambda: gw.configure(timeout_rate=0)[0] == 200, 20, what="gatewaysim timeouts off")
    try:
        pd.wait_all_running(60)
        log("every role is running again")
    except AssertionError as e:
        log("not every role is running: %s" % str(e)[:300])
    settled, quiet_s, why = settle(model, db, gw, account_id, pd)
    log("quiet period: %s after %.1f s (%s)" % ("settled" if settled else "NOT settled", quiet_s, why))

    # ---- gather ----
    rows = db.json(
        "SELECT coalesce(json_agg(json_build_object('id', public_id, 'status', status,"
        " 'capture_method', capture_method, 'amount', amount, 'amount_received', amount_received,"
        " 'amount_capturable', amount_capturable, 'amount_refunded', amount_refunded, 'version', version,"
        " 'amount_refund_pending', (row_to_json(p)->>'amount_refund_pending')::bigint,"
        " 'expires_at', expires_at, 'past_expiry', expires_at < now() - interval '3 seconds',"
        " 'description', description, 'idx', metadata->>'model_idx', 'row', row_to_json(p)) ORDER BY id), '[]')"
        " FROM payment_intents p WHERE account_id = %s" % account_id)
    txn_rows = db.json(
        "SELECT coalesce(json_agg(json_build_object('pi', p.public_id, 'row', row_to_json(t)) ORDER BY t.id),"
        " '[]') FROM payment_transactions t JOIN payment_intents p ON p.id = t.payment_intent_id"
        " WHERE p.account_id = %s" % account_id)
    ev_rows = db.json(
        "SELECT coalesce(json_agg(json_build_object('pi', aggregate_id, 'type', type, 'id', id) ORDER BY id),"
        " '[]') FROM outbox WHERE account_id = %s AND type LIKE 'payment_intent.%%'" % account_id)
    cb_rows = db.json(
        "SELECT coalesce(json_agg(json_build_object('pi', p.public_id, 'row', row_to_json(g))"
        " ORDER BY g.received_at), '[]') FROM gateway_events g LEFT JOIN payment_intents p"
        " ON p.id = g.payment_intent_id")
    refund_rows, refund_ev_rows = [], []
    if model.refunds:
        refund_rows = db.json(
            "SELECT coalesce(json_agg(json_build_object('pi', p.public_id, 'id', r.public_id, 'status', r.status,"
            " 'amount', r.amount, 'key', t.idempotency_key, 'attempt_status', t.status,"
            " 'gateway_id', t.gateway_transaction_id, 'charge', c.gateway_transaction_id, 'row', row_to_json(r))"
            " ORDER BY r.id), '[]') FROM refunds r JOIN payment_intents p ON p.id = r.payment_intent_id"
            " JOIN payment_transactions t ON t.id = r.attempt_id"
            " JOIN payment_transactions c ON c.id = r.charge_attempt_id WHERE r.account_id = %s" % account_id)
        refund_ev_rows = db.json(
            "SELECT coalesce(json_agg(json_build_object('pi', aggregate_id, 'type', type, 'id', id,"
            " 'oid', payload->'data'->'object'->>'id', 'status', payload->'data'->'object'->>'status')"
            " ORDER BY id), '[]') FROM outbox WHERE account_id = %s"
            " AND (type LIKE 'refund.%%' OR type = 'charge.refunded')" % account_id)
    card_re = "|".join(RAW_CARDS)
    raw_hits = db.json(
        "SELECT coalesce(json_agg(x), '[]') FROM (SELECT DISTINCT * FROM ("
        " SELECT 'payment_intents' AS t, public_id AS id FROM payment_intents p"
        "  WHERE row_to_json(p)::text ~ '%s'"
        " UNION ALL SELECT 'outbox', aggregate_id FROM outbox WHERE payload::text ~ '%s') y) x"
        % (card_re, card_re))
    ledger = gw.ledger()
    logs = pd.logs().splitlines()

    rows_by_pid = {r["id"]: r for r in rows}
    idx_count = collections.Counter(r["idx"] for r in rows if r["idx"] is not None)
    txns = collections.defaultdict(list)
    for t in txn_rows:
        txns[t["pi"]].append(t["row"])
    events = collections.defaultdict(list)
    for e in ev_rows:
        events[e["pi"]].append(e)
    callbacks = collections.defaultdict(list)
    for c in cb_rows:
        callbacks[c["pi"]].append(c["row"])
    refunds = collections.defaultdict(list)
    for r in refund_rows:
        refunds[r["pi"]].append(r)
    refund_events = collections.defaultdict(list)
    for e in refund_ev_rows:
        refund_events[e["pi"]].append(e)
    charges = collections.defaultdict(list)
    for ch in ledger.get("data", []):
        charges[(ch.get("idempotency_key") or "").split(":")[0]].append(ch)
    by_idx = {str(p.idx): p for p in programs}

    # ---- check ----
    injected = injected_refund = None
    if o.self_test:
        for r in rows:
            if r["status"] == SUCCEEDED and not refunds.get(r["id"]):
                r["amount_received"] += 1
                injected = r["id"]
                log("SELF-TEST: pretending %s has amount_received one cent higher than it has" % injected)
                break
        for r in refund_rows:
            if r["status"] == RSUCCEEDED and r["pi"] != injected:
                r["status"] = RFAILED
                injected_refund = r["pi"]
                log("SELF-TEST: pretending refund %s of %s failed; it succeeded" % (r["id"], injected_refund))
                break
    violations = collections.defaultdict(list)  # pid or "program #i" -> [(rule, msg)]
    seen_programs = set()
    for r in rows:
        prog = model.by_pid.get(r["id"]) or by_idx.get(r["idx"])
        if prog is not None and (prog.pid not in (None, r["id"]) or prog.idx in seen_programs):
            prog = None  # a second payment for one program: checked on its own
        if prog is not None:
            seen_programs.add(prog.idx)
        v = check_payment(r, prog, charges.get(r["id"], []), events.get(r["id"], []), txns.get(r["id"], []),
                          idx_count.get(r["idx"], 0))
        if model.refunds:
            v += check_refunds(r, prog, charges.get(r["id"], []), refunds.get(r["id"], []),
                               refund_events.get(r["id"], []))
        if prog is not None:
            v += prog.violations + check_resends(prog)
        if v:
            violations[r["id"]] += v
    for p in programs:
        if p.idx not in seen_programs and (p.violations or p.resends):
            v = p.violations + check_resends(p)
            if v:
                violations[p.pid or "program #%d" % p.idx] += v
    for pid, chs in charges.items():
        if pid not in rows_by_pid:
            violations[pid or "(no key)"].append(
                (1, "the gateway holds %d charge(s) for %r, which is no payment of this account"
                 % (len(chs), pid)))
    for ch in ledger.get("data", []):
        if any(card in json.dumps(ch) for card in RAW_CARDS):
            violations[(ch.get("idempotency_key") or "").split(":")[0] or ch["id"]].append(
                (10, "charge %s at the gateway carries a raw card number" % ch["id"]))
    for hit in raw_hits:
        violations[hit["id"]].append((10, "a raw card number is stored in %s" % hit["t"]))
    markers = {r["description"] for r in rows if r["description"]}
    for marker, prog in model.raw_markers:
        if marker in markers:
            violations["program #%d" % prog.idx].append(
                (10, "a request with a raw card number created a payment (%s)" % marker))

    # ---- report ----
    by_rule = collections.defaultdict(list)
    for pid, v in violations.items():
        for rule, msg in v:
            by_rule[rule].append((pid, msg))
    report_lines = []
    printed = set()
    for rule in RULES:
        for pid, msg in by_rule.get(rule, []):
            report_lines.append("VIOLATION rule %d (%s) %s: %s" % (rule, RULES[rule].split(":")[0], pid, msg))
    detail_lines = []
    for rule in RULES:
        pids = []
        for pid, _ in by_rule.get(rule, []):
            if pid not in pids:
                pids.append(pid)
        for n, pid in enumerate(pids):
            prog = model.by_pid.get(pid)
            if prog is None and pid.startswith("program #"):
                prog = programs[int(pid.split("#")[1])]
            if prog is None and pid in rows_by_pid:
                prog = by_idx.get(rows_by_pid[pid]["idx"])
            block = ["", "=" * 100, "payment %s: %s" % (pid, "; ".join(
                "rule %d: %s" % (r, m) for r, m in violations[pid]))]
            block += details(pid, prog, rows_by_pid.get(pid), txns.get(pid, []), events.get(pid, []),
                             callbacks.get(pid, []), charges.get(pid, []), logs, refunds.get(pid, []),
                             refund_events.get(pid, []))
            if pid not in printed:
                detail_lines.append((n < o.details, block))
                printed.add(pid)
    for line in report_lines:
        print(line)
    shown = 0
    for show, block in detail_lines:
        if show:
            shown += 1
            print("\n".join(block))
    report = o.report or os.path.join(tempfile.gettempdir(), "paymentd-model-%d.txt" % o.seed)
    with open(report if violations else os.devnull, "w") as f:
        f.write("model checker, %s\n" % reproduce(o))
        f.write("\n".join(report_lines) + "\n")
        for _, block in detail_lines:
            f.write("\n".join(block) + "\n")
        f.write("\nevery payment's story\n")
        for p in programs:
            if p.pid not in printed:
                f.write("\npayment %s\n%s\n" % (p.pid, "\n".join(story(p))))

    # ---- summary ----
    final = collections.Counter(r["status"] for r in rows)
    gw_status = collections.Counter(c.get("status") for c in ledger.get("data", []))
    n_viol = sum(len(v) for v in violations.values())
    db_refund_status = collections.Counter(r["status"] for r in refund_rows)
    gw_refund_status = collections.Counter(str(x.get("status")) for c in ledger.get("data", [])
                                           for x in c.get("refunds") or [])
    refunded_part = sum(1 for r in rows if 0 < (r["amount_refunded"] or 0) < r["amount_received"])
    refunded_full = sum(1 for r in rows if r["amount_received"] and r["amount_refunded"] == r["amount_received"])
    if model.refund_phases:
        phases = "%d, every %.0f s: %s" % (len(model.refund_phases), REFUND_PHASE_S, "; ".join(
            ",".join("%s=%s" % kv for kv in sorted(c.items())) for _, c in model.refund_phases[:4]))
    else:
        phases = "fixed: async_refund %s, refund_fail_rate %s" % (o.async_refund, o.refund_fail_rate)
    fig = [
        ("seed", o.seed),
        ("payments: programs / in PostgreSQL", "%d / %d" % (o.n, len(rows))),
        ("steps by kind", dict(sorted(model.steps.items()))),
        ("requests by operation", dict(sorted(model.ops.items()))),
        ("HTTP answers", dict(sorted(model.codes.items(), key=lambda kv: str(kv[0])))),
        ("final statuses", dict(sorted(final.items()))),
        ("charges at the gateway", "%d: %s" % (len(ledger.get("data", [])), dict(sorted(gw_status.items(),
                                                                                      key=lambda kv: str(kv[0]))))),
        ("refunds in PostgreSQL", "%d: %s" % (len(refund_rows), dict(sorted(db_refund_status.items())))),
        ("refunds at the gateway", "%d: %s" % (sum(gw_refund_status.values()), dict(sorted(gw_refund_status.items())))),
        ("payments refunded (in part / in full)", "%d / %d" % (refunded_part, refunded_full)),
        ("refunds with metadata fail=true, by status", dict(sorted(collections.Counter(
            r["status"] for r in refund_rows if (r["row"].get("metadata") or {}).get("fail") == "true").items()))),
        ("gateway refund phases", phases),
        ("gateway callbacks recorded", len(cb_rows)),
        ("outbox events", len(ev_rows)),
        ("faults", "%s; gateway timeouts %d %%; callbacks late/jittered/%d %% duplicated%s"
         % (", ".join("%d %s killed" % (n, r) for r, n in sorted(model.kills.items())) or "no kills",
            o.timeout_rate, CALLBACK_DUPLICATES,
            "; gatewaysim lacks " + " ".join(gw.unsupported) if gw.unsupported else "")),
        ("quiet period", "%.1f s, %s" % (quiet_s, "settled" if settled else "NOT settled: " + why)),
        ("drive / total duration", "%.1f s / %.1f s" % (drive_s, time.monotonic() - started)),
    ]
    print("\n%-40s %s" % ("model summary", "value"))
    print("-" * 100)
    for name, value in fig:
        print("%-40s %s" % (name, value))
    print("%-40s %s" % ("violations by rule", "%d in %d payments" % (n_viol, len(violations))))
    for rule, name in RULES.items():
        n = len(by_rule.get(rule, []))
        pays = len({pid for pid, _ in by_rule.get(rule, [])})
        print("  %2d %-60s %5d%s" % (rule, name, n, "  (%d payments)" % pays if n else ""))
    if violations:
        print("full report (every violating payment's story): %s" % report)
    print("reproduce with: %s" % reproduce(o))
    if o.self_test:
        caught = injected is not None and any(r == 1 for r, _ in violations.get(injected, []))
        refund_rules = {r for r, _ in violations.get(injected_refund, [])} if injected_refund else set()
        refund_caught = injected_refund is None or {13, 15} <= refund_rules
        if caught and refund_caught:
            print("\nSELF-TEST PASSED: the injected bookkeeping error on %s was reported as rule 1%s" % (
                injected, "; the refund on %s pretended failed as rules 13 and 15" % injected_refund
                if injected_refund else " (no succeeded refund to corrupt: refunds not self-tested)"))
            return 0
        print("\nSELF-TEST FAILED: %s" % ("no succeeded payment to corrupt" if injected is None
                                          else "the injected error on %s was not reported" % injected
                                          if not caught else
                                          "the refund pretended failed on %s was reported as rules %s, not 13 and 15"
                                          % (injected_refund, sorted(refund_rules))))
        return 1
    if n_viol:
        print("\nMODEL FAILED: %d violations in %d payments (seed %d; %d printed in full above)"
              % (n_viol, len(violations), o.seed, shown))
        return 1
    print("\nmodel passed: every payment's money, authorizations, events and answers agree (seed %d)" % o.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
