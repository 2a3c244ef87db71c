"""The order saga over NNG: InventoryReserved in, PaymentCompleted or
PaymentFailed out through the outbox; one payment and one charge per order
however often it is sent; garbage at the intake is dropped and counted."""
import json
import os
import subprocess
import uuid
import unittest

from harness import BIN, Gateway, Paymentd, migrate, new_account, sql, wait_for
from test_outbox import Subscriber


class SagaTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        migrate()
        cls.gw = Gateway()
        cls.acct, cls.acct_id, _ = new_account("saga")
        cls.pd = Paymentd(GATEWAY_URL=cls.gw.url, SAGA_ACCOUNT=cls.acct, OUTBOX_POLL_MS=200).start()
        wait_for(lambda: "taking InventoryReserved" in cls.pd.logs(), 15, what="intake open")

    @classmethod
    def tearDownClass(cls):
        cls.pd.cleanup()
        cls.gw.stop()

    def send(self, message=None, raw=None):
        args = [os.path.join(BIN, "paymentctl"), "--run-dir", self.pd.run_dir, "intake"]
        if raw is not None:
            args.append("--raw")
        env = {k: v for k, v in self.pd.env.items() if k != "RUN_DIR"}
        r = subprocess.run(args, input=raw if raw is not None else json.dumps(message).encode(),
                           capture_output=True, env=env, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)

    def order(self, pm="pm_card_visa", amount=2599):
        return {"orderId": "ord_" + uuid.uuid4().hex[:12], "amount": amount, "currency": "usd",
                "customerId": "cus_saga", "paymentMethod": pm, "eventId": "evt_inv_" + uuid.uuid4().hex[:8]}

    def test_completed_and_failed(self):
        sub = Subscriber(self.pd)
        self.addCleanup(sub.close)
        ok, bad = self.order(), self.order(pm="pm_card_chargeDeclined", amount=1200)
        self.send(ok)
        self.send(bad)
        mine = lambda ev, o: [e for e in ev if e["type"] in ("PaymentCompleted", "PaymentFailed")
                              and e["event"]["orderId"] == o["orderId"]]
        got = sub.until(lambda ev: mine(ev, ok) and mine(ev, bad))
        done, failed = mine(got, ok)[0], mine(got, bad)[0]
        self.assertEqual(done["type"], "PaymentCompleted")
        body = done["event"]
        self.assertEqual(set(body), {"orderId", "paymentId", "transactionId", "amount", "currency", "timestamp"})
        self.assertEqual((body["amount"], body["currency"]), (2599, "usd"))
        self.assertTrue(body["paymentId"].startswith("pi_"))
        self.assertTrue(body["transactionId"].startswith("txn_"))
        self.assertEqual(sql("SELECT status, order_id FROM payment_intents WHERE public_id = '%s'" % body["paymentId"]),
                         [["succeeded", ok["orderId"]]])
        self.assertEqual(failed["type"], "PaymentFailed")
        self.assertEqual(set(failed["event"]), {"orderId", "paymentId", "reason", "timestamp"})
        self.assertIn("declined", failed["event"]["reason"])
        # The saga's messages follow the payment's own events.
        types = [e["type"] for e in got if e["event"].get("paymentId") == body["paymentId"]
                 or e["event"].get("data", {}).get("object", {}).get("id") == body["paymentId"]]
        self.assertEqual(types, ["payment_intent.created", "payment_intent.succeeded", "PaymentCompleted"])

    def test_same_order_five_times_one_payment_one_charge(self):
        sub = Subscriber(self.pd)
        self.addCleanup(sub.close)
        o = self.order()
        for _ in range(5):
            self.send(o)
        sub.until(lambda ev: any(e["type"] == "PaymentCompleted" and e["event"]["orderId"] == o["orderId"] for e in ev))
        wait_for(lambda: "already has its payment" in self.pd.logs(), 10, what="duplicates ignored")
        rows = sql("SELECT public_id FROM payment_intents WHERE order_id = '%s'" % o["orderId"])
        self.assertEqual(len(rows), 1)
        charges = [c for c in self.gw.ledger()["data"] if (c.get("idempotency_key") or "").startswith(rows[0][0])]
        self.assertEqual(len(charges), 1)
        self.assertEqual(sql("SELECT count(*) FROM outbox WHERE type = 'PaymentCompleted' AND aggregate_id = '%s'" % rows[0][0]),
                         [["1"]])

    def test_garbage_is_dropped_and_the_api_keeps_serving(self):
        before = self.rejected()
        self.send(raw=b"\xc1\xff\x00garbage")
        self.send(raw=b"")
        m = self.order()
        del m["amount"]
        self.send(m)
        m = self.order()
        m["amount"] = -5
        self.send(m)
        wait_for(lambda: self.rejected() >= before + 4, 10, what="four rejections counted")
        self.assertEqual(self.pd.http("/healthz")[0], 200)
        self.assertEqual(self.pd.role("api", 0)["restarts"], 0)
        self.assertIn("dropped an intake message", self.pd.logs())
        # And a good one still goes through.
        sub = Subscriber(self.pd)
        self.addCleanup(sub.close)
        o = self.order()
        self.send(o)
        sub.until(lambda ev: any(e["type"] == "PaymentCompleted" and e["event"]["orderId"] == o["orderId"] for e in ev))

    def rejected(self):
        for line in self.pd.metrics().splitlines():
            if line.startswith("paymentd_saga_messages_rejected_total "):
                return int(line.split()[1])
        return 0


if __name__ == "__main__":
    unittest.main()
