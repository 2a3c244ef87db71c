"""gatewaysim as a faithful gateway: charge states, the ledger, lookups by
idempotency key, refusals, fault injection on every operation and signed
callbacks (late, duplicated, never for a canceled charge).

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


if __name__ == "__main__":
    unittest.main()
