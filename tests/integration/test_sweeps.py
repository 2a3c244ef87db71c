"""The maintenance sweeps: a gateway attempt left pending (its job lost) is
resolved with the same gateway key, never charged twice; intents past
expires_at are canceled with their event, and an expired authorization is
voided at the gateway first; idempotency keys older than 24 h are removed;
the consistency checks report violations."""
import json
import time
import unittest

from harness import Client, Gateway, Paymentd, migrate, new_account, sql, wait_for


class SweepsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        migrate()
        cls.gw = Gateway()
        # The lease must cover a job's worst case: 2 x 1 s + 200 ms + 2 x 1 s.
        cls.pd = Paymentd(GATEWAY_URL=cls.gw.url, SWEEP_INTERVAL_MS=300, GATEWAY_TIMEOUT_MS=1000,
                          GATEWAY_MAX_ATTEMPTS=2, GATEWAY_RETRY_CAP_MS=200, DB_STATEMENT_TIMEOUT_MS=1000,
                          PROCESSING_LEASE_MS=5000, CONSISTENCY_INTERVAL_MS=500).start()
        wait_for(lambda: "leads the maintenance sweeps" in cls.pd.logs(), 20, what="a sweep leader")

    @classmethod
    def tearDownClass(cls):
        cls.pd.cleanup()
        cls.gw.stop()

    def setUp(self):
        _, self.acct_id, key = new_account("sweeps")
        self.c = Client(self.pd.port, key)

    def lost_job(self):
        """A payment confirmed (its attempt written) whose job never reached a
        worker, with the attempt's lease already run out; returns its key."""
        code, pi = self.c.post("/v1/payment_intents", {"amount": 1999, "currency": "usd",
                                                      "payment_method": "pm_card_visa"})
        self.assertEqual(code, 200)
        key = sql("SELECT j.key FROM pi_confirm('%s', %s, NULL, NULL, 'sim', NULL, NULL, 0) r"
                  " JOIN LATERAL attempt_job(r.attempt_id) j ON true" % (pi["id"], self.acct_id))[0][0]
        return pi["id"], key

    def charges_of(self, pi):
        return [c for c in self.gw.ledger()["data"] if (c.get("idempotency_key") or "").startswith(pi + ":")]

    def test_stuck_payment_is_finished(self):
        pi, _ = self.lost_job()
        wait_for(lambda: sql("SELECT status FROM payment_intents WHERE public_id = '%s'" % pi) == [["succeeded"]],
                 20, what="re-driven payment succeeded")
        self.assertEqual(len(self.charges_of(pi)), 1)
        self.assertIn("was pending past its lease", self.pd.logs())

    def test_charge_taken_before_the_loss_is_not_taken_again(self):
        pi, key = self.lost_job()
        # The gateway already took the charge (the worker died before recording it).
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=10)
        conn.request("POST", "/v1/charges", body=json.dumps({"amount": 1999, "currency": "usd",
                                                            "payment_method": "pm_card_visa", "capture": True}),
                     headers={"Content-Type": "application/json",
                              "Idempotency-Key": key})
        taken = json.loads(conn.getresponse().read())
        conn.close()
        wait_for(lambda: sql("SELECT status FROM payment_intents WHERE public_id = '%s'" % pi) == [["succeeded"]],
                 20, what="re-driven payment succeeded")
        charges = self.charges_of(pi)
        self.assertEqual([c["id"] for c in charges], [taken["id"]])
        self.assertEqual(sql("SELECT latest_charge FROM payment_intents WHERE public_id = '%s'" % pi), [[taken["id"]]])

    def test_expired_intent_is_canceled_with_its_event(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 500, "currency": "eur"})
        sql("UPDATE payment_intents SET expires_at = now() - interval '1 second' WHERE public_id = '%s'" % pi["id"])
        wait_for(lambda: self.c.get("/v1/payment_intents/" + pi["id"])[1]["status"] == "canceled", 20,
                 what="expired intent canceled")
        got = self.c.get("/v1/payment_intents/" + pi["id"])[1]
        self.assertEqual(got["cancellation_reason"], "abandoned")
        types = [r[0] for r in sql("SELECT type FROM outbox WHERE aggregate_id = '%s' ORDER BY id" % pi["id"])]
        self.assertEqual(types, ["payment_intent.created", "payment_intent.canceled"])

    def test_old_idempotency_keys_are_removed(self):
        code, _, _ = self.c.call("POST", "/v1/payment_intents", {"amount": 100, "currency": "usd"}, idem="old-key")
        self.assertEqual(code, 200)
        sql("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"
            " WHERE account_id = %s AND idempotency_key = 'old-key'" % self.acct_id)
        wait_for(lambda: sql("SELECT count(*) FROM idempotency_keys WHERE account_id = %s" % self.acct_id) == [["0"]],
                 20, what="old key removed")

    def test_old_gateway_callback_ids_are_removed(self):
        tag = str(time.time_ns())
        sql("INSERT INTO gateway_events (provider, event_id, type, applied, received_at) VALUES"
            " ('sim', 'gwevt_old_%s', 'charge.succeeded', true, now() - interval '31 days'),"
            " ('sim', 'gwevt_new_%s', 'charge.succeeded', true, now() - interval '29 days')" % (tag, tag))
        wait_for(lambda: sql("SELECT count(*) FROM gateway_events WHERE event_id = 'gwevt_old_%s'" % tag) == [["0"]],
                 20, what="old callback id removed")
        self.assertEqual(sql("SELECT count(*) FROM gateway_events WHERE event_id = 'gwevt_new_%s'" % tag), [["1"]])

    def test_expired_authorization_is_voided_then_canceled(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 700, "currency": "usd", "capture_method": "manual",
                                                      "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual(pi["status"], "requires_capture")
        sql("UPDATE payment_intents SET expires_at = now() - interval '1 second' WHERE public_id = '%s'" % pi["id"])
        wait_for(lambda: self.c.get("/v1/payment_intents/" + pi["id"])[1]["status"] == "canceled", 20,
                 what="expired authorization canceled")
        self.assertEqual([c["status"] for c in self.charges_of(pi["id"])], ["canceled"])
        types = [r[0] for r in sql("SELECT type FROM outbox WHERE aggregate_id = '%s' ORDER BY id" % pi["id"])]
        self.assertEqual(types, ["payment_intent.created", "payment_intent.amount_capturable_updated",
                                 "payment_intent.canceled"])

    def test_consistency_violations_are_reported(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 300, "currency": "usd",
                                                      "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual(pi["status"], "succeeded")
        # The state machine allows no such state: only removing its record makes one.
        sql("DELETE FROM payment_transactions WHERE payment_intent_id ="
            " (SELECT id FROM payment_intents WHERE public_id = '%s')" % pi["id"])

        def reported():
            for line in self.pd.metrics().splitlines():
                if line.startswith('paymentd_consistency_violations{check="succeeded_without_transaction"}'):
                    return int(line.split()[-1]) >= 1
            return False
        wait_for(reported, 20, what="violation reported")
        self.assertIn("consistency check:", self.pd.logs())
        sql("DELETE FROM outbox WHERE aggregate_id = '%s'" % pi["id"])
        sql("DELETE FROM payment_intents WHERE public_id = '%s'" % pi["id"])


if __name__ == "__main__":
    unittest.main()
