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
in between. The next step follows the last status seen, and now and then an
operation the state does not allow is sent on purpose. A scheduler runs the
steps of every payment on MODEL_CLIENTS threads (keep-alive connections), so
that all payments are in flight at once and a pause holds no thread.

Faults: gatewaysim times out on MODEL_TIMEOUT_RATE % of calls after doing
them; with MODEL_KILLS=1 a random worker is killed (-9) every few seconds and
an api process once or twice; gatewaysim's callbacks come late, out of order
and duplicated. Then a quiet period: the faults stop and the checker waits
(up to 90 s) until no payment is processing, no attempt is pending and
neither the database nor the ledger has changed for a while.

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

Environment: MODEL_SEED (random when unset; always printed with the command
that runs the same programs again), MODEL_N payments (300), MODEL_CLIENTS
threads (16), MODEL_KILLS (1: kill workers and an api process; 0: no kills),
MODEL_TIMEOUT_RATE percent (3), MODEL_ASYNC_CAPTURE (0; 1: captures settle by
callback), MODEL_DETAILS (payments printed in full per rule, 3),
MODEL_REPORT (a file for the full report; default in the temp directory).
`--self-test` also pretends one payment's bookkeeping is off by one cent and
exits 0 only if the checker catches it loudly. Servers: its own PostgreSQL
and Redis (scripts/lib.sh), gatewaysim and paymentd (PAYMENTD_BIN,
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
])


def env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


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
        if self.status:
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
        if a.replayed:
            return
        pi = a.pi
        if pi:
            self.status = pi.get("status")
            self.amount = pi.get("amount", self.amount)
            self.capturable = pi.get("amount_capturable") or 0
            self.capture_method = pi.get("capture_method", self.capture_method)
            if a.code == 402:
                self.declined = True
        elif a.code == 400 and a.err_code == "payment_intent_unexpected_state":
            m = re.search(r"status of (\w+)", a.obj["error"].get("message", ""))
            if m:
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
        if observe:
            self.observe(op, a)
        if key and a.definite and method == "POST":
            self.keyed.append((op, method, path, params, key, a))
        return a

    def path(self, suffix=""):
        return "/v1/payment_intents/%s%s" % (self.pid, suffix)

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
              ("rawcard", 0.4), ("expire", 0.5), ("retrieve", 0.4)],
        RC: [("confirm_nopm", 5), ("confirm_pm", 2), ("update_meta", 1), ("update_amount", 1),
             ("cancel", 1.5), ("confirm_then_cancel", 1), ("pair_confirm_cancel", 1),
             ("pair_confirm_confirm", 1), ("same_key_pair", 0.4), ("capture", 0.4), ("resend", 1),
             ("rawcard", 0.4), ("expire", 0.5), ("retrieve", 0.3)],
        RA: [("confirm_pm", 4), ("confirm_nopm", 2.5), ("cancel", 2.5), ("update_amount", 1),
             ("update_meta", 0.7), ("capture", 0.4), ("confirm_then_cancel", 1), ("pair_confirm_cancel", 1.2),
             ("pair_confirm_confirm", 1.5), ("wait", 2), ("expire", 0.8), ("resend", 1), ("rawcard", 0.3),
             ("retrieve", 0.5)],
        PROCESSING: [("retrieve", 3), ("wait", 2), ("cancel", 1), ("capture", 0.5), ("confirm_nopm", 0.5),
                     ("resend", 0.5)],
        RCAP: [("capture_full", 3), ("capture_partial", 2.5), ("capture_too_much", 0.4), ("cancel", 2.5),
               ("pair_capture_cancel", 2), ("pair_capture_capture", 1.5), ("expire", 1), ("update_meta", 0.5),
               ("confirm_pm", 0.4), ("resend", 1), ("retrieve", 0.3), ("rawcard", 0.2)],
        SUCCEEDED: [("capture", 1), ("cancel", 1), ("confirm_pm", 0.8), ("update_meta", 0.7), ("resend", 1.5),
                    ("retrieve", 0.5), ("rawcard", 0.3)],
        CANCELED: [("capture", 1), ("cancel", 1), ("confirm_pm", 0.8), ("update_meta", 0.7), ("resend", 1.5),
                   ("retrieve", 0.5), ("rawcard", 0.3)],
        UNKNOWN: [("retrieve", 4), ("resend", 1)],
    }

    def step(self):
        """Runs one step; returns the pause before the next, or None when done."""
        if self.steps_done >= self.steps_total:
            return None
        self.steps_done += 1
        if self.pid is None:
            if self.steps_done > 1:
                return None  # the create never got an answer: nothing to drive
            self.a_create()
            return self.pause()
        weights = self.WEIGHTS.get(self.status, self.WEIGHTS[UNKNOWN])
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


def details(pid, prog, row, txns, events, callbacks, charges, logs):
    out = ["  story:"] + story(prog)
    out.append("  payment_intents: %s" % (json.dumps(row["row"], sort_keys=True) if row else "(none)"))
    out.append("  payment_transactions (%d):" % len(txns))
    out += ["    %s" % json.dumps(t, sort_keys=True) for t in txns]
    out.append("  outbox events: %s" % [e["type"] for e in events])
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
                                 ("MODEL_ASYNC_CAPTURE", o.async_capture, 0)):
        if value != default:
            cmd += " %s=%d" % (name, value)
    return cmd + " python3 tests/model/model.py" + (" --self-test" if o.self_test else "")


CALLBACK_SECRET = "whsec_model_checker_callbacks_0123456789"
CALLBACK_DELAY_MS, CALLBACK_JITTER_MS, CALLBACK_DUPLICATES = 700, 800, 20


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
            rows = db.sql("SELECT count(*) FILTER (WHERE status = 'processing'),"
                          " md5(coalesce(string_agg(public_id || ':' || status || ':' || version, ','"
                          "  ORDER BY id), '')),"
                          " (SELECT count(*) FROM payment_transactions t JOIN payment_intents q"
                          "  ON q.id = t.payment_intent_id WHERE q.account_id = %s AND t.status = 'pending')"
                          " FROM payment_intents WHERE account_id = %s" % (account_id, account_id)).split("|")
            ledger = gw.ledger()
        except Exception as e:  # a restarting role or database: keep waiting
            why = str(e)
            time.sleep(1)
            continue
        processing, fp_db, pending = int(rows[0]), rows[1], int(rows[2])
        gw_pending = sum(1 for c in ledger.get("data", []) if c.get("status") == "pending")
        fp = (fp_db, hashlib.md5(json.dumps(ledger, sort_keys=True).encode()).hexdigest())
        if fp != last:
            last, stable_since = fp, time.monotonic()
        why = "%d processing, %d attempts pending, %d gateway charges pending, stable for %.1f s" % (
            processing, pending, gw_pending, time.monotonic() - stable_since)
        if processing == 0 and pending == 0 and gw_pending == 0 and time.monotonic() - stable_since >= window:
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
    programs = [Pay(model, i) for i in range(o.n)]
    if o.timeout_rate:
        gw.configure(timeout_rate=o.timeout_rate)
    stop = threading.Event()
    fault_thread = threading.Thread(target=model.faults, args=(pd, stop), daemon=True)
    fault_thread.start()
    log("driving %d payments (%d steps in all) on %d threads" % (o.n, sum(p.steps_total for p in programs),
                                                                o.clients))
    drive_start = time.monotonic()
    model.drive(programs)
    drive_s = time.monotonic() - drive_start
    stop.set()
    fault_thread.join()
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
    charges = collections.defaultdict(list)
    for ch in ledger.get("data", []):
        charges[(ch.get("idempotency_key") or "").split(":")[0]].append(ch)
    by_idx = {str(p.idx): p for p in programs}

    # ---- check ----
    injected = None
    if o.self_test:
        for r in rows:
            if r["status"] == SUCCEEDED:
                r["amount_received"] += 1
                injected = r["id"]
                log("SELF-TEST: pretending %s has amount_received one cent higher than it has" % injected)
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
                             callbacks.get(pid, []), charges.get(pid, []), logs)
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
    fig = [
        ("seed", o.seed),
        ("payments: programs / in PostgreSQL", "%d / %d" % (o.n, len(rows))),
        ("steps by kind", dict(sorted(model.steps.items()))),
        ("requests by operation", dict(sorted(model.ops.items()))),
        ("HTTP answers", dict(sorted(model.codes.items(), key=lambda kv: str(kv[0])))),
        ("final statuses", dict(sorted(final.items()))),
        ("charges at the gateway", "%d: %s" % (len(ledger.get("data", [])), dict(sorted(gw_status.items(),
                                                                                      key=lambda kv: str(kv[0]))))),
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
        if caught:
            print("\nSELF-TEST PASSED: the injected bookkeeping error on %s was reported as rule 1" % injected)
            return 0
        print("\nSELF-TEST FAILED: %s" % ("no succeeded payment to corrupt" if injected is None
                                          else "the injected error on %s was not reported" % injected))
        return 1
    if n_viol:
        print("\nMODEL FAILED: %d violations in %d payments (seed %d; %d printed in full above)"
              % (n_viol, len(violations), o.seed, shown))
        return 1
    print("\nmodel passed: every payment's money, authorizations, events and answers agree (seed %d)" % o.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
