"""gatewaysim as a faithful gateway: charge and refund states, the ledger,
lookups by idempotency key, refusals, fault injection on every operation and
signed callbacks (late, duplicated, never for a canceled charge or refund).

Needs no database: each test starts its own gatewaysim and, where callbacks
are involved, a small HTTP server in this process that receives them.
"""
import hashlib
import hmac
import http.client
import http.server
import json
import os
import socket
import threading
import time
import unittest
import uuid

from harness import Gateway, free_port, wait_for

SECRET = "whsec_gatewaysim_test"
DELAY_MS = 200


class Receiver:
    """Collects the gateway's callbacks; answers each with the next status in
    `answers` (then 200), and checks every signature."""

    def __init__(self, answers=()):
        self.events = []  # (event dict, raw body, signature header)
        self.bad_signatures = 0
        self.answers = list(answers)
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sig = self.headers.get("Gateway-Signature", "")
                with receiver.lock:
                    if receiver.verify(sig, body):
                        receiver.events.append((json.loads(body), body, sig))
                    else:
                        receiver.bad_signatures += 1
                    code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = "http://127.0.0.1:%d/hooks" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def verify(header, body):
        parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
        if "t" not in parts or "v1" not in parts:
            return False
        want = hmac.new(SECRET.encode(), parts["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(want, parts["v1"])

    def of(self, charge_id):
        with self.lock:
            return [e for e, _, _ in self.events if e["data"]["object"]["id"] == charge_id]

    def wait(self, charge_id, count=1, timeout=5):
        return wait_for(lambda: len(self.of(charge_id)) >= count and self.of(charge_id), timeout,
                        interval=0.02, what="%d callback(s) for %s" % (count, charge_id))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class GatewaysimCase(unittest.TestCase):
    callbacks = True
    extra = ()

    def setUp(self):
        args = list(self.extra)
        self.rx = None
        if self.callbacks:
            self.rx = Receiver()
            args += ["--callback-url", self.rx.url, "--callback-secret", SECRET,
                     "--callback-delay-ms", str(DELAY_MS)]
        self.gw = Gateway(*args)
        self.addCleanup(self.cleanup)

    def cleanup(self):
        self.gw.stop()
        if self.rx:
            self.rx.close()
            self.assertEqual(self.rx.bad_signatures, 0)

    def post(self, path, body, key=None, timeout=5):
        """POSTs with an optional Idempotency-Key; returns (status, JSON)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=timeout)
        try:
            h = {"Content-Type": "application/json"}
            if key:
                h["Idempotency-Key"] = key
            conn.request("POST", path, body=json.dumps(body), headers=h)
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            conn.close()

    def charge(self, pm="pm_card_visa", amount=1000, capture=True, key=None, **extra):
        body = dict(amount=amount, currency="usd", payment_method=pm, capture=capture, **extra)
        code, ch = self.post("/v1/charges", body, key=key)
        self.assertEqual(code, 200, ch)
        return ch

    def get(self, charge_id):
        code, ch = self.gw.request("GET", "/v1/charges/" + charge_id)
        self.assertEqual(code, 200, ch)
        return ch

    def by_key(self, key):
        return self.gw.request("GET", "/v1/charges?idempotency_key=" + key)

    def in_ledger(self, charge_id):
        return [c for c in self.gw.ledger()["data"] if c["id"] == charge_id][0]

    def refund(self, charge_id, amount=None, key=None, code=200, **extra):
        """POSTs a refund; asserts the status code; returns the body."""
        body = dict(charge=charge_id, **extra)
        if amount is not None:
            body["amount"] = amount
        got, re = self.post("/v1/refunds", body, key=key)
        self.assertEqual(got, code, re)
        return re

    def refund_by_key(self, key):
        return self.gw.request("GET", "/v1/refunds?idempotency_key=" + key)

    def get_refund(self, refund_id):
        code, re = self.gw.request("GET", "/v1/refunds/" + refund_id)
        self.assertEqual(code, 200, re)
        return re

    def refund_ops(self, charge_id):
        return [(o["op"], o["amount"], o["status"]) for o in self.in_ledger(charge_id)["operations"]
                if o["op"].startswith("refund")]


class TestSettlement(GatewaysimCase):
    def test_manual_3ds_settles_to_requires_capture(self):
        ch = self.charge("pm_card_threeDSecureRequired", capture=False, key="k-manual-3ds")
        self.assertEqual(ch["status"], "requires_action")
        self.assertEqual(ch["amount_authorized"], 0)
        self.assertFalse(ch["captured"])
        (ev,) = self.rx.wait(ch["id"])
        self.assertEqual(ev["type"], "charge.succeeded")
        self.assertTrue(ev["id"].startswith("gwevt_"))
        obj = ev["data"]["object"]
        self.assertEqual(obj["status"], "requires_capture")
        self.assertFalse(obj["captured"])
        self.assertEqual(obj["amount_authorized"], 1000)
        self.assertEqual(obj["amount_captured"], 0)
        self.assertEqual(self.get(ch["id"])["status"], "requires_capture")
        code, cap = self.post("/v1/charges/%s/capture" % ch["id"], {"amount": 700})
        self.assertEqual(code, 200, cap)
        self.assertEqual((cap["status"], cap["captured"], cap["amount_captured"]),
                         ("succeeded", True, 700))
        self.assertEqual([o["op"] for o in cap["operations"]], ["create", "settle", "capture"])

    def test_automatic_3ds_settles_to_succeeded(self):
        ch = self.charge("pm_card_authenticationRequired", amount=1500)
        (ev,) = self.rx.wait(ch["id"])
        obj = ev["data"]["object"]
        self.assertEqual((ev["type"], obj["status"], obj["captured"]), ("charge.succeeded", "succeeded", True))
        self.assertEqual((obj["amount_authorized"], obj["amount_captured"]), (1500, 1500))

    def test_canceled_3ds_charge_never_settles(self):
        ch = self.charge("pm_card_authenticationRequired", key="k-cancel-3ds")
        code, canceled = self.post("/v1/charges/%s/cancel" % ch["id"], {}, key="k-cancel-3ds-c")
        self.assertEqual(code, 200, canceled)
        self.assertEqual((canceled["status"], canceled["voided"]), ("canceled", True))
        time.sleep((DELAY_MS + 400) / 1000)
        self.assertEqual(self.rx.of(ch["id"]), [])
        now = self.get(ch["id"])
        self.assertEqual(now["status"], "canceled")
        self.assertEqual([o["op"] for o in now["operations"]], ["create", "cancel"])

    def test_declining_3ds_method_sends_charge_failed(self):
        ch = self.charge("pm_card_authenticationRequiredChargeDeclinedInsufficientFunds")
        self.assertEqual(ch["status"], "requires_action")
        (ev,) = self.rx.wait(ch["id"])
        obj = ev["data"]["object"]
        self.assertEqual(ev["type"], "charge.failed")
        self.assertEqual((obj["status"], obj["failure_code"], obj["decline_code"]),
                         ("failed", "card_declined", "insufficient_funds"))
        self.assertEqual((obj["amount_authorized"], obj["amount_captured"]), (0, 0))
        self.assertEqual(self.get(ch["id"])["status"], "failed")

    def test_lookup_by_key_returns_the_current_state(self):
        ch = self.charge("pm_card_threeDSecureRequired", key="k-lookup")
        code, first = self.by_key("k-lookup")
        self.assertEqual((code, first["id"], first["status"]), (200, ch["id"], "requires_action"))
        self.rx.wait(ch["id"])
        code, now = self.by_key("k-lookup")
        self.assertEqual((code, now["id"], now["status"], now["captured"]), (200, ch["id"], "succeeded", True))
        code, err = self.by_key("k-never-seen")
        self.assertEqual((code, err), (404, {"error": {"message": "no request with this idempotency key"}}))
        # A key whose request touched no charge leads nowhere either.
        code, _ = self.post("/v1/charges", {"amount": 0, "currency": "usd", "payment_method": "pm_card_visa"},
                            key="k-invalid")
        self.assertEqual(code, 400)
        self.assertEqual(self.by_key("k-invalid")[0], 404)

    def test_duplicate_rate_sends_each_event_twice(self):
        self.gw.configure(callback_duplicate_rate=100, callback_jitter_ms=100)
        ids = [self.charge("pm_card_authenticationRequired")["id"] for _ in range(3)]
        for cid in ids:
            evs = self.rx.wait(cid, count=2)
            self.assertEqual(evs[0]["id"], evs[1]["id"])
            self.assertEqual(evs[0], evs[1])
        time.sleep(1.2)  # no third copy
        for cid in ids:
            self.assertEqual(len(self.rx.of(cid)), 2)

    def test_reset_forgets_charges_and_their_timers(self):
        ch = self.charge("pm_card_authenticationRequired")
        self.assertEqual(self.post("/_reset", {})[0], 200)
        time.sleep((DELAY_MS + 300) / 1000)
        self.assertEqual(self.rx.of(ch["id"]), [])
        self.assertEqual(self.gw.ledger(), {"charges": 0, "data": []})


class TestRetries(GatewaysimCase):
    extra = ("--callback-tries", "2")

    def test_callback_retried_until_tries_run_out(self):
        self.rx.answers = [500, 500, 500]
        ch = self.charge("pm_card_authenticationRequired")
        evs = self.rx.wait(ch["id"], count=2)
        self.assertEqual(evs[0]["id"], evs[1]["id"])
        time.sleep(1.5)
        self.assertEqual(len(self.rx.of(ch["id"])), 2)


class TestAsyncCapture(GatewaysimCase):
    extra = ("--async-capture",)

    def test_capture_pends_then_sends_charge_captured(self):
        ch = self.charge(capture=False, amount=900)
        code, cap = self.post("/v1/charges/%s/capture" % ch["id"], {"amount": 800})
        self.assertEqual((code, cap["status"], cap["amount_to_capture"], cap["captured"]),
                         (200, "pending", 800, False))
        (ev,) = self.rx.wait(ch["id"])
        obj = ev["data"]["object"]
        self.assertEqual((ev["type"], obj["status"], obj["amount_captured"]), ("charge.captured", "succeeded", 800))
        self.assertEqual([o["status"] for o in obj["operations"]], ["requires_capture", "pending", "succeeded"])


class TestNoCallbacks(GatewaysimCase):
    callbacks = False

    def test_requires_action_waits_without_callbacks(self):
        ch = self.charge("pm_card_threeDSecureRequired", capture=False)
        time.sleep(0.7)  # past the default callback delay
        self.assertEqual(self.get(ch["id"])["status"], "requires_action")

    def test_refusals_carry_the_charge(self):
        done = self.charge()
        code, body = self.post("/v1/charges/%s/capture" % done["id"], {}, key="k-refused")
        self.assertEqual(code, 400)
        self.assertEqual(body["error"]["code"], "charge_not_capturable")
        self.assertEqual((body["charge"]["id"], body["charge"]["status"]), (done["id"], "succeeded"))
        self.assertEqual(self.post("/v1/charges/%s/capture" % done["id"], {}, key="k-refused"), (code, body))
        code, body = self.post("/v1/charges/%s/cancel" % done["id"], {})
        self.assertEqual((code, body["error"]["code"], body["charge"]["id"]), (400, "charge_not_cancelable", done["id"]))

        auth = self.charge(capture=False, amount=500)
        code, body = self.post("/v1/charges/%s/capture" % auth["id"], {"amount": 501})
        self.assertEqual((code, body["error"]["code"], body["charge"]["status"]),
                         (400, "charge_not_capturable", "requires_capture"))
        self.assertEqual(self.post("/v1/charges/%s/cancel" % auth["id"], {})[0], 200)
        code, body = self.post("/v1/charges/%s/capture" % auth["id"], {})
        self.assertEqual((code, body["charge"]["status"], body["charge"]["voided"]), (400, "canceled", True))
        self.assertEqual(self.post("/v1/charges/ch_nope/capture", {})[0], 404)

    def test_ledger_fields(self):
        a = self.charge(capture=False, amount=1000, key="k-a", metadata={"order": "o1"})
        self.assertEqual(self.post("/v1/charges/%s/capture" % a["id"], {"amount": 600}, key="k-a-cap")[0], 200)
        code, refund = self.post("/v1/refunds", {"charge": a["id"], "amount": 200}, key="k-a-ref")
        self.assertEqual((code, refund["object"], refund["amount"]), (200, "refund", 200))
        b = self.charge(capture=False, amount=300)
        self.assertEqual(self.post("/v1/charges/%s/cancel" % b["id"], {})[0], 200)
        d = self.charge("pm_card_chargeDeclined", amount=50)

        ledger = self.gw.ledger()
        self.assertEqual(ledger["charges"], 3)
        self.assertEqual([c["id"] for c in ledger["data"]], [a["id"], b["id"], d["id"]])
        la, lb, ld = ledger["data"]
        self.assertEqual((la["status"], la["captured"], la["capture"], la["voided"]), ("succeeded", True, False, False))
        self.assertEqual((la["amount_authorized"], la["amount_captured"], la["amount_refunded"]), (1000, 600, 200))
        self.assertEqual((la["idempotency_key"], la["metadata"], la["object"]), ("k-a", {"order": "o1"}, "charge"))
        self.assertEqual([(o["op"], o["key"], o["amount"], o["status"]) for o in la["operations"]],
                         [("create", "k-a", 1000, "requires_capture"),
                          ("capture", "k-a-cap", 600, "succeeded"),
                          ("refund", "k-a-ref", 200, "succeeded")])
        self.assertTrue(all(isinstance(o["at_ms"], int) and o["at_ms"] > 1e12 for o in la["operations"]))
        self.assertEqual((lb["status"], lb["voided"], lb["amount_authorized"], lb["amount_captured"]),
                         ("canceled", True, 300, 0))
        self.assertEqual((lb["idempotency_key"], lb["metadata"]), (None, {}))
        self.assertEqual((ld["status"], ld["amount_authorized"], ld["decline_code"]), ("failed", 0, "generic_decline"))
        # Keys of a capture and a refund lead to the charge they acted on, as it is now.
        for key in ("k-a", "k-a-cap", "k-a-ref"):
            code, now = self.by_key(key)
            self.assertEqual((code, now["id"], now["amount_refunded"]), (200, a["id"], 200))

    def test_timeout_on_capture_still_captures(self):
        ch = self.charge(capture=False, amount=400)
        self.gw.configure(timeout_rate=100)
        with self.assertRaises(socket.timeout):
            self.post("/v1/charges/%s/capture" % ch["id"], {}, key="k-timeout-cap", timeout=0.5)
        self.gw.configure(timeout_rate=0)
        now = self.in_ledger(ch["id"])
        self.assertEqual((now["status"], now["amount_captured"]), ("succeeded", 400))
        self.assertEqual(now["operations"][-1]["key"], "k-timeout-cap")
        # The retry with the same key gets the first answer and captures nothing more.
        code, again = self.post("/v1/charges/%s/capture" % ch["id"], {}, key="k-timeout-cap")
        self.assertEqual((code, again["status"], len(again["operations"])), (200, "succeeded", 2))

    def test_faults_apply_to_cancel_and_refund(self):
        auth = self.charge(capture=False)
        done = self.charge()
        self.gw.configure(fail_rate=100)
        code, body = self.post("/v1/charges/%s/cancel" % auth["id"], {}, key="k-503")
        self.assertEqual((code, body["processed"]), (503, False))
        code, body = self.post("/v1/refunds", {"charge": done["id"], "amount": 100})
        self.assertEqual((code, body["processed"]), (503, False))
        self.gw.configure(fail_rate=0, reset_rate=100)
        with self.assertRaises((ConnectionError, http.client.RemoteDisconnected)):
            self.post("/v1/refunds", {"charge": done["id"], "amount": 100}, key="k-reset")
        self.gw.configure(reset_rate=0)
        self.assertEqual(self.in_ledger(auth["id"])["status"], "requires_capture")  # the 503 did nothing
        self.assertEqual(self.in_ledger(done["id"])["amount_refunded"], 100)        # the reset did it
        self.assertEqual(self.post("/v1/charges/%s/cancel" % auth["id"], {}, key="k-503")[0], 200)

    def test_swallowed_answers_release_their_sockets(self):
        self.gw.configure(timeout_rate=100)
        fds = lambda: len(os.listdir("/proc/%d/fd" % self.gw.proc.pid))
        before = fds()
        for i in range(20):
            with self.assertRaises(socket.timeout):
                self.post("/v1/charges", {"amount": 1, "currency": "usd", "payment_method": "pm_card_visa"},
                          key=uuid.uuid4().hex, timeout=0.2)
        wait_for(lambda: fds() <= before + 1, 5, what="gatewaysim to close abandoned connections")
        self.assertEqual(self.gw.ledger()["charges"], 20)


class TestRefunds(GatewaysimCase):
    """Synchronous refunds (the default), without callbacks."""
    callbacks = False

    def test_partial_refunds_up_to_the_captured_amount(self):
        ch = self.charge(capture=False, amount=1000)
        self.assertEqual(self.post("/v1/charges/%s/capture" % ch["id"], {"amount": 800})[0], 200)
        a = self.refund(ch["id"], 300, key="k-r1", metadata={"reason": "damaged"})
        self.assertTrue(a["id"].startswith("re_"))
        self.assertEqual((a["object"], a["amount"], a["currency"], a["charge"], a["status"]),
                         ("refund", 300, "usd", ch["id"], "succeeded"))
        self.assertEqual((a["idempotency_key"], a["metadata"], a["failure_reason"]),
                         ("k-r1", {"reason": "damaged"}, None))
        self.assertIsInstance(a["created"], int)
        self.assertEqual(self.get_refund(a["id"]), a)

        err = self.refund(ch["id"], 501, code=400)
        self.assertEqual(err["error"]["code"], "amount_too_large")
        self.assertEqual((err["charge"]["id"], err["charge"]["amount_refunded"]), (ch["id"], 300))
        b = self.refund(ch["id"], key="k-r2")  # all that is left
        self.assertEqual((b["amount"], b["status"], b["metadata"]), (500, "succeeded", {}))
        err = self.refund(ch["id"], 1, code=400)
        self.assertEqual(err["error"]["code"], "charge_already_refunded")
        err = self.refund(ch["id"], code=400)
        self.assertEqual(err["error"]["code"], "charge_already_refunded")
        self.assertEqual(self.refund(ch["id"], 0, code=400)["error"]["code"], "parameter_invalid_integer")
        self.assertEqual(self.refund("ch_nope", 1, code=404)["error"]["message"], "no such charge")

        now = self.in_ledger(ch["id"])
        self.assertEqual((now["status"], now["amount_captured"], now["amount_refunded"], now["refunded"]),
                         ("succeeded", 800, 800, True))
        self.assertEqual([(r["id"], r["status"]) for r in now["refunds"]],
                         [(a["id"], "succeeded"), (b["id"], "succeeded")])
        self.assertEqual(self.refund_ops(ch["id"]), [("refund", 300, "succeeded"), ("refund", 500, "succeeded")])
        self.assertEqual([o.get("refund") for o in now["operations"]], [None, None, a["id"], b["id"]])
        # The refunds' keys: the refund on /v1/refunds, the charge on /v1/charges.
        code, got = self.refund_by_key("k-r1")
        self.assertEqual((code, got), (200, a))
        code, got = self.by_key("k-r2")
        self.assertEqual((code, got["id"], got["refunded"]), (200, ch["id"], True))

    def test_a_charge_not_captured_is_not_refundable(self):
        auth = self.charge(capture=False, amount=500)
        err = self.refund(auth["id"], 100, code=400, key="k-not-refundable")
        self.assertEqual((err["error"]["code"], err["charge"]["status"]), ("charge_not_refundable", "requires_capture"))
        declined = self.charge("pm_card_chargeDeclined")
        self.assertEqual(self.refund(declined["id"], code=400)["error"]["code"], "charge_not_refundable")
        self.assertEqual(self.in_ledger(auth["id"])["refunds"], [])
        self.assertEqual(self.refund_by_key("k-not-refundable")[0], 404)  # no refund was made

    def test_refund_fail_rate_fails_refunds(self):
        ch = self.charge(amount=700)
        self.gw.configure(refund_fail_rate=100)
        re = self.refund(ch["id"], 200, key="k-fail-rate")
        self.assertEqual((re["status"], re["failure_reason"]), ("failed", "declined"))
        self.gw.configure(refund_fail_rate=0)
        now = self.in_ledger(ch["id"])
        self.assertEqual((now["amount_refunded"], now["refunded"]), (0, False))
        self.assertEqual(self.refund_ops(ch["id"]), [("refund", 200, "failed")])
        # A failed refund holds nothing: the whole amount can still be refunded.
        self.assertEqual(self.refund(ch["id"])["amount"], 700)
        self.assertEqual(self.in_ledger(ch["id"])["amount_refunded"], 700)

    def test_metadata_fail_true_fails(self):
        ch = self.charge(amount=700)
        re = self.refund(ch["id"], 100, metadata={"fail": "true"})
        self.assertEqual((re["status"], re["failure_reason"]), ("failed", "declined"))
        self.assertEqual(self.in_ledger(ch["id"])["amount_refunded"], 0)

    def test_cancel_of_a_succeeded_refund_is_refused(self):
        ch = self.charge(amount=700)
        re = self.refund(ch["id"], 100)
        code, err = self.post("/v1/refunds/%s/cancel" % re["id"], {}, key="k-late-cancel")
        self.assertEqual((code, err["error"]["code"], err["refund"]), (400, "refund_not_cancelable", re))
        self.assertEqual(self.post("/v1/refunds/%s/cancel" % re["id"], {}, key="k-late-cancel"), (code, err))
        self.assertEqual(self.post("/v1/refunds/re_nope/cancel", {})[0], 404)
        self.assertEqual(self.in_ledger(ch["id"])["amount_refunded"], 100)

    def test_timeout_on_refund_still_refunds_once(self):
        ch = self.charge(amount=600)
        self.gw.configure(timeout_rate=100)
        with self.assertRaises(socket.timeout):
            self.post("/v1/refunds", {"charge": ch["id"], "amount": 250}, key="k-timeout-ref", timeout=0.5)
        self.gw.configure(timeout_rate=0)
        now = self.in_ledger(ch["id"])
        self.assertEqual((now["amount_refunded"], len(now["refunds"])), (250, 1))
        code, found = self.refund_by_key("k-timeout-ref")
        self.assertEqual((code, found["status"], found["amount"]), (200, "succeeded", 250))
        # The retry with the same key gets the first answer and refunds nothing more.
        code, again = self.post("/v1/refunds", {"charge": ch["id"], "amount": 250}, key="k-timeout-ref")
        self.assertEqual((code, again), (200, found))
        now = self.in_ledger(ch["id"])
        self.assertEqual((now["amount_refunded"], len(now["refunds"])), (250, 1))
        self.assertEqual(self.refund_ops(ch["id"]), [("refund", 250, "succeeded")])

    def test_async_refund_settles_without_callbacks(self):
        ch = self.charge(amount=500)
        self.assertEqual(self.gw.configure(async_refund=True)[0], 200)
        self.assertEqual(self.gw.configure(async_refund=1)[0], 400)
        re = self.refund(ch["id"], 200, key="k-poll")
        self.assertEqual(re["status"], "pending")
        self.assertEqual(self.in_ledger(ch["id"])["amount_refunded"], 0)
        wait_for(lambda: self.get_refund(re["id"])["status"] == "succeeded", 5, interval=0.05,
                 what="the refund to settle")
        self.assertEqual(self.in_ledger(ch["id"])["amount_refunded"], 200)
        self.gw.configure(async_refund=False)
        self.assertEqual(self.refund(ch["id"], 100)["status"], "succeeded")

    def test_reset_forgets_refunds(self):
        ch = self.charge(amount=500)
        re = self.refund(ch["id"], 100, key="k-reset-ref")
        self.assertEqual(self.post("/_reset", {})[0], 200)
        self.assertEqual(self.gw.request("GET", "/v1/refunds/" + re["id"])[0], 404)
        self.assertEqual(self.refund_by_key("k-reset-ref")[0], 404)


class TestAsyncRefunds(GatewaysimCase):
    extra = ("--async-refund",)

    def events(self, object_id, count=1):
        """The raw callbacks about object_id, each checked against its signature."""
        self.rx.wait(object_id, count)
        with self.rx.lock:
            raw = [(e, body, sig) for e, body, sig in self.rx.events if e["data"]["object"]["id"] == object_id]
        for _, body, sig in raw:
            self.assertTrue(Receiver.verify(sig, body))
        return [e for e, _, _ in raw]

    def test_refund_settles_with_both_callbacks(self):
        ch = self.charge(amount=1000)
        re = self.refund(ch["id"], 400, key="k-async")
        self.assertEqual((re["status"], re["amount"]), ("pending", 400))
        now = self.in_ledger(ch["id"])
        self.assertEqual((now["amount_refunded"], [r["status"] for r in now["refunds"]]), (0, ["pending"]))
        # A pending refund holds its amount.
        self.assertEqual(self.refund(ch["id"], 601, code=400)["error"]["code"], "amount_too_large")
        self.assertEqual(self.refund_by_key("k-async")[1]["status"], "pending")

        (updated,) = self.events(re["id"])
        (refunded,) = self.events(ch["id"])
        self.assertNotEqual(updated["id"], refunded["id"])
        self.assertEqual(updated["type"], "refund.updated")
        self.assertEqual(dict(updated["data"]["object"], status="pending"), re)
        self.assertEqual(updated["data"]["object"]["status"], "succeeded")
        self.assertEqual(refunded["type"], "charge.refunded")
        obj = refunded["data"]["object"]
        self.assertEqual((obj["amount_refunded"], obj["refunded"]), (400, False))
        self.assertEqual([(r["id"], r["status"]) for r in obj["refunds"]], [(re["id"], "succeeded")])

        self.assertEqual(self.in_ledger(ch["id"])["amount_refunded"], 400)
        self.assertEqual(self.refund_ops(ch["id"]), [("refund", 400, "pending"), ("refund_settle", 400, "succeeded")])
        self.assertEqual(self.refund_by_key("k-async")[1]["status"], "succeeded")

    def test_cancel_of_a_pending_refund(self):
        ch = self.charge(amount=1000)
        re = self.refund(ch["id"], 1000, key="k-to-cancel")
        self.assertEqual(self.refund(ch["id"], code=400)["error"]["code"], "charge_already_refunded")
        code, canceled = self.post("/v1/refunds/%s/cancel" % re["id"], {}, key="k-cancel-ref")
        self.assertEqual((code, canceled["id"], canceled["status"]), (200, re["id"], "canceled"))
        self.assertEqual(self.post("/v1/refunds/%s/cancel" % re["id"], {}, key="k-cancel-ref"), (code, canceled))
        code, err = self.post("/v1/refunds/%s/cancel" % re["id"], {})
        self.assertEqual((code, err["error"]["code"], err["refund"]["status"]), (400, "refund_not_cancelable", "canceled"))
        self.assertEqual(self.refund_by_key("k-cancel-ref")[1], canceled)
        self.assertEqual(self.refund_by_key("k-to-cancel")[1]["status"], "canceled")

        time.sleep((DELAY_MS + 400) / 1000)
        self.assertEqual((self.rx.of(re["id"]), self.rx.of(ch["id"])), ([], []))
        now = self.in_ledger(ch["id"])
        self.assertEqual((now["amount_refunded"], now["refunded"]), (0, False))
        self.assertEqual(self.refund_ops(ch["id"]), [("refund", 1000, "pending"), ("refund_cancel", 1000, "canceled")])

        # The canceled amount can be refunded again.
        again = self.refund(ch["id"])
        self.assertEqual((again["amount"], again["status"]), (1000, "pending"))
        self.events(again["id"])
        now = self.in_ledger(ch["id"])
        self.assertEqual((now["amount_refunded"], now["refunded"]), (1000, True))
        self.assertEqual([r["status"] for r in now["refunds"]], ["canceled", "succeeded"])

    def test_failing_async_refund_sends_refund_updated_only(self):
        ch = self.charge(amount=1000)
        re = self.refund(ch["id"], 300, metadata={"fail": "true"})
        self.assertEqual(re["status"], "pending")
        (ev,) = self.events(re["id"])
        self.assertEqual((ev["type"], ev["data"]["object"]["status"], ev["data"]["object"]["failure_reason"]),
                         ("refund.updated", "failed", "declined"))
        time.sleep(0.3)
        self.assertEqual(self.rx.of(ch["id"]), [])
        self.assertEqual(self.in_ledger(ch["id"])["amount_refunded"], 0)
        self.assertEqual(self.refund_ops(ch["id"]), [("refund", 300, "pending"), ("refund_settle", 300, "failed")])

    def test_refund_events_are_duplicated_like_charge_events(self):
        self.gw.configure(callback_duplicate_rate=100, callback_jitter_ms=100)
        ch = self.charge(amount=1000)
        re = self.refund(ch["id"], 100)
        updated = self.events(re["id"], 2)
        refunded = self.events(ch["id"], 2)
        self.assertEqual(updated[0], updated[1])
        self.assertEqual(refunded[0], refunded[1])
        self.assertNotEqual(updated[0]["id"], refunded[0]["id"])

    def test_faults_apply_to_refund_cancel(self):
        ch = self.charge(amount=1000)
        re = self.refund(ch["id"], 100)
        self.gw.configure(fail_rate=100)
        code, body = self.post("/v1/refunds/%s/cancel" % re["id"], {}, key="k-503-cancel")
        self.assertEqual((code, body["processed"]), (503, False))
        self.gw.configure(fail_rate=0, reset_rate=100)
        with self.assertRaises((ConnectionError, http.client.RemoteDisconnected)):
            self.post("/v1/refunds/%s/cancel" % re["id"], {}, key="k-reset-cancel")
        self.gw.configure(reset_rate=0)
        self.assertEqual(self.get_refund(re["id"])["status"], "canceled")  # the reset did it
        time.sleep((DELAY_MS + 300) / 1000)
        self.assertEqual(self.rx.of(re["id"]), [])
        code, body = self.post("/v1/refunds/%s/cancel" % re["id"], {}, key="k-reset-cancel")
        self.assertEqual((code, body["status"]), (200, "canceled"))


if __name__ == "__main__":
    unittest.main()
