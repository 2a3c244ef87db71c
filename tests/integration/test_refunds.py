"""Refunds against gatewaysim's ledger: never more than was captured, under
concurrency too; through the gateway exactly once, with its timeouts after
refunding; failed and canceled refunds give their amount back; events and
the saga's PaymentRefunded."""
import hashlib
import hmac
import json
import threading
import time
import unittest

from harness import Client, Gateway, Paymentd, migrate, new_account, sql, wait_for

SECRET = "whsec_refunds_test_secret_0123456789"


def setUpModule():
    migrate()


class RefundsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pd = Paymentd(GATEWAY_WEBHOOK_SECRET=SECRET, CONFIRM_WAIT_MS=5000, GATEWAY_TIMEOUT_MS=1000,
                          GATEWAY_MAX_ATTEMPTS=2, GATEWAY_RETRY_CAP_MS=200, DB_STATEMENT_TIMEOUT_MS=1000,
                          PROCESSING_LEASE_MS=5000, SWEEP_INTERVAL_MS=300)
        cls.gw = Gateway("--callback-url", "http://127.0.0.1:%d/v1/gateway_webhooks/sim" % cls.pd.port,
                         "--callback-secret", SECRET, "--callback-delay-ms", "800")
        cls.pd.env["GATEWAY_URL"] = cls.gw.url
        cls.acct, cls.acct_id, cls.key = new_account("refunds")
        cls.pd.env["SAGA_ACCOUNT"] = cls.acct
        cls.pd.start()
        wait_for(lambda: cls.pd.json("/readyz")[0] == 200, 20, what="ready")
        cls.c = Client(cls.pd.port, cls.key)

    @classmethod
    def tearDownClass(cls):
        cls.pd.cleanup()
        cls.gw.stop()

    def setUp(self):
        self.gw.configure(timeout_rate=0, async_refund=False, refund_fail_rate=0)

    # ---- helpers ----

    def paid(self, amount=3000, **kw):
        params = {"amount": amount, "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}
        params.update(kw)
        code, pi = self.c.post("/v1/payment_intents", params)
        self.assertEqual((code, pi["status"]), (200, "succeeded"), pi)
        return pi

    def gateway_refunded(self, pi):
        return sum(ch["amount_refunded"] for ch in self.gw.ledger()["data"]
                   if (ch.get("idempotency_key") or "").startswith(pi + ":"))

    def gateway_refunds(self, pi):
        return [r for ch in self.gw.ledger()["data"]
                if (ch.get("idempotency_key") or "").startswith(pi + ":") for r in ch.get("refunds") or []]

    def row(self, pi):
        r = sql("SELECT amount_received, amount_refunded, amount_refund_pending FROM payment_intents"
                " WHERE public_id = '%s'" % pi)[0]
        return [int(x) for x in r]

    def refund(self, **params):
        return self.c.post("/v1/refunds", params)

    def callback(self, ev):
        """A signed gateway callback, as gatewaysim would send it."""
        body = json.dumps(ev)
        t = str(int(time.time()))
        sig = hmac.new(SECRET.encode(), (t + "." + body).encode(), hashlib.sha256).hexdigest()
        code, text, _ = Client(self.pd.port, None).call(
            "POST", "/v1/gateway_webhooks/sim", raw=body,
            headers={"Gateway-Signature": "t=%s,v1=%s" % (t, sig), "Content-Type": "application/json"})
        return code, json.loads(text)

    def events(self, pi):
        return [r[0] for r in sql("SELECT type FROM outbox WHERE aggregate_id = '%s' ORDER BY id" % pi)]

    # ---- tests ----

    def test_partial_refunds_events_and_the_rest(self):
        pi = self.paid()
        code, r1 = self.refund(payment_intent=pi["id"], amount=1000, reason="requested_by_customer")
        self.assertEqual((code, r1["status"], r1["amount"], r1["reason"]), (200, "succeeded", 1000,
                                                                          "requested_by_customer"))
        code, rest = self.refund(charge=pi["latest_charge"])
        self.assertEqual((code, rest["amount"]), (200, 2000))
        code, err = self.refund(payment_intent=pi["id"], amount=1)
        self.assertEqual((code, err["error"]["code"]), (400, "charge_already_refunded"))
        self.assertEqual(self.row(pi["id"]), [3000, 3000, 0])
        self.assertEqual(self.gateway_refunded(pi["id"]), 3000)
        code, ch = self.c.get("/v1/charges/" + pi["latest_charge"])
        self.assertEqual((ch["refunded"], ch["amount_refunded"], len(ch["refunds"]["data"])), (True, 3000, 2))
        ev = self.events(pi["id"])
        self.assertEqual(ev[2:], ["refund.created", "refund.updated", "charge.refunded"] * 2)

    def test_refusals(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 500, "currency": "usd"})
        code, err = self.refund(payment_intent=pi["id"])
        self.assertEqual((code, err["error"]["code"]), (400, "charge_not_refundable"))
        code, err = self.refund(payment_intent="pi_nope")
        self.assertEqual((code, err["error"]["code"]), (404, "resource_missing"))
        code, err = self.refund(amount=5)
        self.assertEqual((code, err["error"]["code"]), (400, "parameter_missing"))
        paid = self.paid(900)
        code, err = self.refund(payment_intent=paid["id"], amount=901)
        self.assertEqual((code, err["error"]["code"], err["error"]["param"]), (400, "amount_too_large", "amount"))
        code, err = self.refund(payment_intent=paid["id"], reason="bored")
        self.assertEqual((code, err["error"]["param"]), (400, "reason"))
        self.assertEqual(self.row(paid["id"]), [900, 0, 0])

    def test_same_idempotency_key_refunds_once(self):
        pi = self.paid(1200)
        answers = [self.c.call("POST", "/v1/refunds", {"payment_intent": pi["id"], "amount": 400},
                               idem="refund-once-" + pi["id"]) for _ in range(3)]
        self.assertEqual(len({a[1] for a in answers}), 1)
        self.assertEqual(self.row(pi["id"]), [1200, 400, 0])
        self.assertEqual(len(self.gateway_refunds(pi["id"])), 1)

    def test_fifty_concurrent_partial_refunds_never_exceed_the_capture(self):
        pi = self.paid(5000)
        results = []
        lock = threading.Lock()

        def one():
            got = self.refund(payment_intent=pi["id"], amount=200)
            with lock:
                results.append(got)

        threads = [threading.Thread(target=one) for _ in range(50)]  # 10,000: twice the capture
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [r for code, r in results if code == 200]
        refused = [r["error"]["code"] for code, r in results if code != 200]
        self.assertEqual(len(ok), 25, refused)
        self.assertTrue(set(refused) <= {"amount_too_large", "charge_already_refunded"}, refused)
        wait_for(lambda: self.row(pi["id"])[2] == 0, 20, what="no refund pending")
        self.assertEqual(self.row(pi["id"]), [5000, 5000, 0])
        self.assertEqual(self.gateway_refunded(pi["id"]), 5000)
        self.assertEqual(len([r for r in self.gateway_refunds(pi["id"]) if r["status"] == "succeeded"]), 25)

    def test_timeouts_after_refunding_refund_once(self):
        pi = self.paid(2000)
        self.gw.configure(timeout_rate=100)  # the gateway refunds, the answer never comes
        code, r = self.refund(payment_intent=pi["id"], amount=700)
        self.assertEqual((code, r["status"]), (200, "pending"))
        self.assertEqual(self.row(pi["id"]), [2000, 0, 700])  # held while unknown
        self.gw.configure(timeout_rate=0)
        wait_for(lambda: self.c.get("/v1/refunds/" + r["id"])[1]["status"] == "succeeded", 30,
                 what="re-driven with the same key")
        self.assertEqual(self.row(pi["id"]), [2000, 700, 0])
        self.assertEqual(len(self.gateway_refunds(pi["id"])), 1)
        self.assertEqual(self.gateway_refunded(pi["id"]), 700)

    def test_failed_refund_gives_its_amount_back(self):
        pi = self.paid(1000)
        self.gw.configure(refund_fail_rate=100)
        code, r = self.refund(payment_intent=pi["id"])
        self.assertEqual((code, r["status"], r["failure_reason"]), (200, "failed", "declined"))
        self.assertEqual(self.row(pi["id"]), [1000, 0, 0])
        self.assertIn("refund.failed", self.events(pi["id"]))
        self.gw.configure(refund_fail_rate=0)
        code, r = self.refund(payment_intent=pi["id"])
        self.assertEqual((code, r["status"], r["amount"]), (200, "succeeded", 1000))

    def test_async_refund_settles_by_callback_and_cancel_while_pending(self):
        self.gw.configure(async_refund=True)
        pi = self.paid(1500)
        code, r = self.refund(payment_intent=pi["id"], amount=500)
        self.assertEqual((code, r["status"]), (200, "pending"))
        wait_for(lambda: self.c.get("/v1/refunds/" + r["id"])[1]["status"] == "succeeded", 20,
                 what="settled by callback")
        code, r2 = self.refund(payment_intent=pi["id"], amount=500)
        self.assertEqual(r2["status"], "pending")
        code, c2 = self.c.post("/v1/refunds/%s/cancel" % r2["id"], {})
        self.assertEqual((code, c2["status"]), (200, "canceled"), c2)
        self.assertEqual(self.row(pi["id"]), [1500, 500, 0])
        code, err = self.c.post("/v1/refunds/%s/cancel" % r["id"], {})
        self.assertEqual((code, err["error"]["code"]), (400, "refund_not_cancelable"))
        time.sleep(1.5)  # the canceled one never settles
        self.assertEqual(self.gateway_refunded(pi["id"]), 500)
        code, r3 = self.refund(payment_intent=pi["id"])  # what is left, the canceled 500 included
        self.assertEqual((code, r3["amount"]), (200, 1000))

    def test_charge_refunded_items_are_matched_one_by_one(self):
        # A charge.refunded listing our pending refund (in a state we do not
        # act on) and then a refund made at the gateway directly: the second
        # must not be taken for the first.
        self.gw.configure(async_refund=True)
        pi = self.paid(3000)
        code, r = self.refund(payment_intent=pi["id"], amount=1000)
        self.assertEqual(r["status"], "pending")
        key = sql("SELECT t.idempotency_key FROM refunds x JOIN payment_transactions t ON t.id = x.attempt_id"
                  " WHERE x.public_id = '%s'" % r["id"])[0][0]
        charge = {"id": pi["latest_charge"], "object": "charge", "refunds": {"data": [
            {"id": "re_gw_ours", "object": "refund", "status": "requires_action", "amount": 1000,
             "metadata": {"paymentd_attempt": key}},
            {"id": "re_gw_other", "object": "refund", "status": "succeeded", "amount": 50}]}}
        code, got = self.callback({"id": "gwevt_cr_%d" % time.time_ns(), "type": "charge.refunded",
                                   "data": {"object": charge}})
        self.assertEqual((code, got.get("applied")), (200, False), got)
        self.assertNotEqual(sql("SELECT coalesce(gateway_transaction_id, '') FROM payment_transactions"
                                " WHERE idempotency_key = '%s'" % key), [["re_gw_other"]])
        # A refund.updated for a refund nobody holds: recorded as not ours, not 404.
        code, got = self.callback({"id": "gwevt_ru_%d" % time.time_ns(), "type": "refund.updated",
                                   "data": {"object": {"id": "re_gw_other", "object": "refund",
                                                       "status": "succeeded", "amount": 50}}})
        self.assertEqual((code, got.get("applied")), (200, False), got)
        wait_for(lambda: self.c.get("/v1/refunds/" + r["id"])[1]["status"] == "succeeded", 20,
                 what="the real settlement")
        self.assertEqual(self.row(pi["id"]), [3000, 1000, 0])

    def test_a_refund_failed_after_it_succeeded_is_refundable_again(self):
        pi = self.paid(2000)
        code, r = self.refund(payment_intent=pi["id"])
        self.assertEqual((r["status"], self.row(pi["id"])), ("succeeded", [2000, 2000, 0]))
        gw_refund = [x for x in self.gateway_refunds(pi["id"])][0]
        gw_refund = dict(gw_refund, status="failed", failure_reason="expired_or_canceled_card")
        code, got = self.callback({"id": "gwevt_rf_%d" % time.time_ns(), "type": "refund.updated",
                                   "data": {"object": gw_refund}})
        self.assertEqual((code, got.get("applied")), (200, True), got)
        got = self.c.get("/v1/refunds/" + r["id"])[1]
        self.assertEqual((got["status"], got["failure_reason"]), ("failed", "expired_or_canceled_card"))
        self.assertEqual(self.row(pi["id"]), [2000, 0, 0])
        self.assertEqual(self.events(pi["id"])[-1], "refund.failed")
        code, again = self.refund(payment_intent=pi["id"])
        self.assertEqual((code, again["amount"]), (200, 2000))

    def intake(self, pm):
        import os
        import subprocess
        from harness import BIN
        msg = json.dumps({"orderId": "ord-refund-t%d" % time.time_ns(), "amount": 2500, "currency": "usd",
                          "customerId": "cus_r", "paymentMethod": pm, "eventId": "evt_r"})
        out = subprocess.run([os.path.join(BIN, "paymentctl"), "--run-dir", self.pd.run_dir, "intake"],
                             input=msg, capture_output=True, text=True, timeout=20,
                             env={k: v for k, v in self.pd.env.items() if k != "RUN_DIR"})
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        return json.loads(out.stdout)["paymentId"]

    def test_saga_hears_a_later_success_after_a_failure(self):
        pid = self.intake("pm_card_chargeDeclined")
        wait_for(lambda: self.c.get("/v1/payment_intents/" + pid)[1]["status"] == "requires_payment_method",
                 20, what="declined")
        code, ok = self.c.post("/v1/payment_intents/%s/confirm" % pid, {"payment_method": "pm_card_visa"})
        self.assertEqual(ok["status"], "succeeded")
        code, _ = self.c.post("/v1/payment_intents/%s/cancel" % pid, {})  # refused: it succeeded
        self.assertEqual(code, 400)
        told = [r[0] for r in sql("SELECT type FROM outbox WHERE aggregate_id = '%s' AND aggregate_type = 'order'"
                                  " ORDER BY id" % pid)]
        self.assertEqual(told, ["PaymentFailed", "PaymentCompleted"])

    def test_saga_hears_payment_refunded(self):
        pid = self.intake("pm_card_visa")
        wait_for(lambda: self.c.get("/v1/payment_intents/" + pid)[1]["status"] == "succeeded", 20,
                 what="order paid")
        code, r = self.refund(payment_intent=pid, amount=1000)
        self.assertEqual(r["status"], "succeeded")
        rows = sql("SELECT payload FROM outbox WHERE aggregate_id = '%s' AND type = 'PaymentRefunded'" % pid)
        self.assertEqual(len(rows), 1)
        body = json.loads(rows[0][0])
        self.assertEqual((body["paymentId"], body["refundId"], body["amount"], body["currency"]),
                         (pid, r["id"], 1000, "usd"))


if __name__ == "__main__":
    unittest.main()
