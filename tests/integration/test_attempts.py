"""The paths between the features, each against gatewaysim's ledger: gateway
attempts stay open until final, one operation is in flight per payment, and
the state machine in PostgreSQL refuses what its table does not allow.

The first three tests are the reproductions that once lost money: a re-confirm
during 3-D Secure charged twice, a capture after a declined attempt captured the
declined charge, and a raw card number was charged."""
import hashlib
import hmac
import json
import os
import subprocess
import threading
import time
import unittest

from harness import BIN, SOURCE, Client, Gateway, Paymentd, migrate, new_account, sql, wait_for

SECRET = "whsec_attempts_test_secret_0123456789"


def setUpModule():
    migrate()


class AttemptsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # The gateway completes 3-D Secure by a signed callback 1.5 s later.
        cls.pd = Paymentd(GATEWAY_WEBHOOK_SECRET=SECRET, CONFIRM_WAIT_MS=5000)
        cls.gw = Gateway("--callback-url", "http://127.0.0.1:%d/v1/gateway_webhooks/sim" % cls.pd.port,
                         "--callback-secret", SECRET, "--callback-delay-ms", "1500")
        cls.pd.env["GATEWAY_URL"] = cls.gw.url
        cls.pd.start()
        wait_for(lambda: cls.pd.json("/readyz")[0] == 200, 20, what="ready")
        cls.acct, cls.acct_id, cls.key = new_account("attempts")
        cls.c = Client(cls.pd.port, cls.key)

    @classmethod
    def tearDownClass(cls):
        cls.pd.cleanup()
        cls.gw.stop()

    # ---- helpers ----

    def charges(self, pi):
        return [ch for ch in self.gw.ledger()["data"]
                if (ch.get("idempotency_key") or "").startswith(pi + ":")]

    def captured(self, pi):
        return sum(ch["amount_captured"] - ch["amount_refunded"] for ch in self.charges(pi))

    def row(self, pi):
        return sql("SELECT status, amount_received, amount_capturable FROM payment_intents"
                   " WHERE public_id = '%s'" % pi)[0]

    def attempts(self, pi):
        return sql("SELECT t.type, t.status FROM payment_transactions t JOIN payment_intents p"
                   " ON p.id = t.payment_intent_id WHERE p.public_id = '%s' ORDER BY t.id" % pi)

    def events(self, pi):
        return [r[0] for r in sql("SELECT type FROM outbox WHERE aggregate_id = '%s' ORDER BY id" % pi)]

    def settle(self, pi, status, timeout=20):
        return wait_for(lambda: self.c.get("/v1/payment_intents/" + pi)[1]["status"] == status and
                        self.c.get("/v1/payment_intents/" + pi)[1], timeout, what="%s %s" % (pi, status))

    def wait_quiet(self, pi):
        """Until no attempt is pending and the gateway's timers for it have fired."""
        wait_for(lambda: not [a for a in self.attempts(pi) if a[1] == "pending"], 20,
                 what="no pending attempt")
        time.sleep(2.0)

    def create(self, **kw):
        params = {"amount": 5000, "currency": "usd"}
        params.update(kw)
        code, pi = self.c.post("/v1/payment_intents", params)
        if code == 402:
            pi = pi["error"]["payment_intent"]
        return code, pi

    # ---- the three reproductions ----

    def test_reconfirm_during_3ds_charges_once(self):
        code, pi = self.create(payment_method="pm_card_authenticationRequired", confirm="true")
        self.assertEqual((code, pi["status"]), (200, "requires_action"))
        # The customer gives up; the merchant confirms with another card.
        code, pi2 = self.c.post("/v1/payment_intents/%s/confirm" % pi["id"],
                                {"payment_method": "pm_card_visa"})
        self.assertEqual((code, pi2["status"]), (200, "succeeded"), pi2)
        self.wait_quiet(pi["id"])
        charges = self.charges(pi["id"])
        self.assertEqual(sorted(ch["status"] for ch in charges), ["canceled", "succeeded"], charges)
        self.assertEqual(self.captured(pi["id"]), 5000)
        self.assertEqual(self.row(pi["id"])[:2], ["succeeded", "5000"])
        self.assertEqual([a for a in self.attempts(pi["id"])],
                         [["charge", "canceled"], ["void", "succeeded"], ["charge", "succeeded"]])
        self.assertEqual(self.events(pi["id"]).count("payment_intent.succeeded"), 1)

    def test_capture_after_a_declined_attempt_captures_the_authorization(self):
        code, pi = self.create(capture_method="manual", payment_method="pm_card_chargeDeclined",
                               confirm="true")
        self.assertEqual((code, pi["status"]), (402, "requires_payment_method"))
        # The declined card is detached, as Stripe does.
        self.assertIsNone(pi["payment_method"])
        code, err = self.c.post("/v1/payment_intents/%s/confirm" % pi["id"], {})
        self.assertEqual((code, err["error"]["code"]), (400, "parameter_missing"))
        code, pi2 = self.c.post("/v1/payment_intents/%s/confirm" % pi["id"],
                                {"payment_method": "pm_card_visa"})
        self.assertEqual((code, pi2["status"]), (200, "requires_capture"))
        code, pi3 = self.c.post("/v1/payment_intents/%s/capture" % pi["id"], {"amount_to_capture": 3000})
        self.assertEqual((code, pi3["status"], pi3["amount_received"]), (200, "succeeded", 3000), pi3)
        charges = self.charges(pi["id"])
        self.assertEqual(sorted((ch["status"], ch["amount_captured"]) for ch in charges),
                         [("failed", 0), ("succeeded", 3000)])

    def test_raw_card_number_is_refused_and_nothing_charged(self):
        before = self.gw.ledger()["charges"]
        code, err = self.c.post("/v1/payment_intents", {"amount": 5000, "currency": "usd",
                                                         "payment_method": "4242424242424242",
                                                         "confirm": "true"})
        self.assertEqual((code, err["error"]["param"]), (400, "payment_method"))
        self.assertNotIn("4242424242424242", json.dumps(err))
        self.assertEqual(self.gw.ledger()["charges"], before)

    # ---- the other paths between the features ----

    def test_cancel_during_3ds_voids_and_the_charge_never_settles(self):
        code, pi = self.create(payment_method="pm_card_authenticationRequired", confirm="true")
        self.assertEqual(pi["status"], "requires_action")
        code, got = self.c.post("/v1/payment_intents/%s/cancel" % pi["id"], {})
        self.assertEqual((code, got["status"]), (200, "canceled"), got)
        self.wait_quiet(pi["id"])
        self.assertEqual([ch["status"] for ch in self.charges(pi["id"])], ["canceled"])
        self.assertEqual(self.captured(pi["id"]), 0)
        self.assertEqual(self.row(pi["id"])[0], "canceled")

    def test_manual_3ds_resolves_by_callback_to_requires_capture(self):
        code, pi = self.create(capture_method="manual", payment_method="pm_card_authenticationRequired",
                               confirm="true")
        self.assertEqual(pi["status"], "requires_action")
        got = self.settle(pi["id"], "requires_capture")
        self.assertEqual(got["amount_capturable"], 5000)
        code, cap = self.c.post("/v1/payment_intents/%s/capture" % pi["id"], {})
        self.assertEqual((code, cap["status"], cap["amount_received"]), (200, "succeeded", 5000))
        self.assertEqual(self.captured(pi["id"]), 5000)

    def test_amount_cannot_change_during_3ds(self):
        code, pi = self.create(payment_method="pm_card_authenticationRequired", confirm="true")
        code, err = self.c.post("/v1/payment_intents/" + pi["id"], {"amount": 100})
        self.assertEqual((code, err["error"]["code"]), (400, "payment_intent_unexpected_state"))
        code, ok = self.c.post("/v1/payment_intents/" + pi["id"], {"metadata[k]": "v"})
        self.assertEqual((code, ok["metadata"]), (200, {"k": "v"}))
        got = self.settle(pi["id"], "succeeded")
        self.assertEqual((got["amount"], got["amount_received"]), (5000, 5000))

    def test_concurrent_capture_and_cancel_one_wins_the_other_is_refused(self):
        for _ in range(3):
            code, pi = self.create(capture_method="manual", payment_method="pm_card_visa", confirm="true")
            self.assertEqual(pi["status"], "requires_capture")
            results = {}

            def op(name):
                results[name] = self.c.post("/v1/payment_intents/%s/%s" % (pi["id"], name), {})

            threads = [threading.Thread(target=op, args=(n,)) for n in ("capture", "cancel")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            codes = sorted((name, code) for name, (code, _) in results.items())
            winners = [name for name, code in codes if code == 200]
            self.assertEqual(len(winners), 1, results)
            loser = [name for name, code in codes if code != 200][0]
            self.assertEqual(results[loser][1]["error"]["code"], "payment_intent_unexpected_state")
            final = self.row(pi["id"])[0]
            self.assertEqual(final, {"capture": "succeeded", "cancel": "canceled"}[winners[0]])
            self.assertEqual(self.captured(pi["id"]), 5000 if winners[0] == "capture" else 0)
            self.assertEqual([ch["status"] for ch in self.charges(pi["id"])],
                             ["succeeded" if winners[0] == "capture" else "canceled"])

    def test_late_callback_for_an_old_attempt_is_ignored(self):
        # 3-D Secure that fails by callback, then a new card: the old charge's
        # callback (failed) arrives while the payment is requires_payment_method
        # or later, and changes nothing.
        code, pi = self.create(payment_method="pm_card_authenticationRequiredChargeDeclinedInsufficientFunds",
                               confirm="true")
        got = self.settle(pi["id"], "requires_payment_method")
        self.assertEqual(got["last_payment_error"]["code"], "card_declined")
        code, ok = self.c.post("/v1/payment_intents/%s/confirm" % pi["id"], {"payment_method": "pm_card_visa"})
        self.assertEqual((code, ok["status"]), (200, "succeeded"))
        self.assertEqual(self.captured(pi["id"]), 5000)
        # A forged-late repeat of a charge.failed for the first charge: recorded, ignored.
        first = [ch for ch in self.charges(pi["id"]) if ch["status"] == "failed"][0]
        body = json.dumps({"id": "gwevt_late_" + pi["id"], "type": "charge.failed", "created": int(time.time()),
                           "data": {"object": first}})
        t = str(int(time.time()))
        sig = hmac.new(SECRET.encode(), (t + "." + body).encode(), hashlib.sha256).hexdigest()
        code, text, _ = Client(self.pd.port, None).call(
            "POST", "/v1/gateway_webhooks/sim", raw=body,
            headers={"Gateway-Signature": "t=%s,v1=%s" % (t, sig), "Content-Type": "application/json"})
        self.assertEqual((code, json.loads(text)), (200, {"received": True, "applied": False}))
        self.assertEqual(self.row(pi["id"])[0], "succeeded")

    def test_the_database_refuses_an_illegal_transition(self):
        code, pi = self.create(payment_method="pm_card_visa", confirm="true")
        self.assertEqual(pi["status"], "succeeded")
        for stmt in ("UPDATE payment_intents SET status = 'canceled' WHERE public_id = '%s'",
                     "UPDATE payment_intents SET status = 'canceled', transition = 'cancel'"
                     " WHERE public_id = '%s'"):
            with self.assertRaises(AssertionError) as e:
                sql(stmt % pi["id"])
            self.assertIn("transition", str(e.exception))
        with self.assertRaises(AssertionError):
            sql("UPDATE payment_transactions SET status = 'pending' WHERE payment_intent_id ="
                " (SELECT id FROM payment_intents WHERE public_id = '%s')" % pi["id"])
        self.assertEqual(self.row(pi["id"])[0], "succeeded")

    def test_transitions_table_is_the_programs_and_the_readmes(self):
        """The database enforces the table the programs were built with, and
        the README shows that same table."""
        printed = subprocess.run([os.path.join(BIN, "paymentctl"), "transitions"], capture_output=True,
                                 text=True, check=True).stdout
        payments, refunds = printed.split("\nRefunds:\n")
        def rows(table):
            return sorted([c.strip().strip("`") for c in line.strip("|").split("|")][:4]
                          for line in table.strip().splitlines()[2:])
        db = sql("SELECT CASE from_status WHEN '' THEN '(new)' ELSE from_status END, event, to_status,"
                 " coalesce(outbox_event, '-') FROM payment_transitions")
        self.assertEqual(rows(payments), sorted(db))
        db = sql("SELECT CASE from_status WHEN '' THEN '(new)' ELSE from_status END, event, to_status,"
                 " outbox_event FROM refund_transitions")
        self.assertEqual(rows(refunds), sorted(db))
        with open(os.path.join(SOURCE, "README.md")) as f:
            self.assertIn(printed, f.read())


class CallbacksThroughAnAuthBlockTest(unittest.TestCase):
    """An address blocked for bad API keys (the gateway's, on one host) still
    delivers its signed callbacks: a 3-D Secure outcome is not lost."""

    def test_callbacks_are_not_blocked_with_the_address(self):
        pd = Paymentd(GATEWAY_WEBHOOK_SECRET=SECRET, RATE_LIMIT_AUTH_FAILURES=3)
        gw = Gateway("--callback-url", "http://127.0.0.1:%d/v1/gateway_webhooks/sim" % pd.port,
                     "--callback-secret", SECRET, "--callback-delay-ms", "1500")
        self.addCleanup(gw.stop)
        pd.env["GATEWAY_URL"] = gw.url
        self.addCleanup(pd.cleanup)
        pd.start()
        _, _, key = new_account("authblock")
        c = Client(pd.port, key)
        code, pi = c.post("/v1/payment_intents", {"amount": 700, "currency": "usd", "confirm": "true",
                                                  "payment_method": "pm_card_authenticationRequired"})
        self.assertEqual(pi["status"], "requires_action")
        bad = Client(pd.port, "sk_test_wrong")
        codes = [bad.get("/v1/payment_intents")[0] for _ in range(5)]
        self.assertIn(429, codes)  # the address is blocked now, right key or not
        self.assertEqual(c.get("/v1/payment_intents/" + pi["id"])[0], 429)
        wait_for(lambda: sql("SELECT status FROM payment_intents WHERE public_id = '%s'" % pi["id"])
                 == [["succeeded"]], 20, what="the callback applied through the block")


if __name__ == "__main__":
    unittest.main()
