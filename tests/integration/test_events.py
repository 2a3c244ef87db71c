"""GET /v1/events and /v1/events/:id: Stripe's event shape, filters, keyset
pages, account scope; every state change has its event, and a change whose
transaction failed has none."""
import unittest

from harness import Client, Gateway, Paymentd, migrate, new_account, sql, wait_for


class EventsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        migrate()
        cls.gw = Gateway()
        cls.pd = Paymentd(GATEWAY_URL=cls.gw.url).start()
        wait_for(lambda: cls.pd.json("/readyz")[0] == 200, 20, what="ready")
        _, cls.acct_id, key = new_account("events")
        cls.c = Client(cls.pd.port, key)

    @classmethod
    def tearDownClass(cls):
        cls.pd.cleanup()
        cls.gw.stop()

    def test_events_of_a_payment(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 1200, "currency": "usd",
                                                      "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual((code, pi["status"]), (200, "succeeded"))
        code, page = self.c.get("/v1/events", {"limit": 2})
        self.assertEqual(code, 200)
        self.assertEqual((page["object"], page["url"]), ("list", "/v1/events"))
        newest, older = page["data"]
        self.assertEqual([newest["type"], older["type"]], ["payment_intent.succeeded", "payment_intent.created"])
        for ev in (newest, older):
            self.assertTrue(ev["id"].startswith("evt_"))
            self.assertEqual((ev["object"], ev["livemode"]), ("event", False))
            self.assertIsInstance(ev["created"], int)
            self.assertEqual(ev["data"]["object"]["id"], pi["id"])
        self.assertEqual(newest["data"]["object"]["status"], "succeeded")
        code, one = self.c.get("/v1/events/" + newest["id"])
        self.assertEqual((code, one), (200, newest))
        code, typed = self.c.get("/v1/events", {"type": "payment_intent.created", "limit": 100})
        self.assertTrue(all(e["type"] == "payment_intent.created" for e in typed["data"]))
        self.assertIn(older["id"], [e["id"] for e in typed["data"]])

    def test_pages_and_isolation(self):
        for i in range(12):
            self.assertEqual(self.c.post("/v1/payment_intents", {"amount": 100 + i, "currency": "usd"})[0], 200)
        total = int(sql("SELECT count(*) FROM outbox WHERE account_id = %s" % self.acct_id)[0][0])
        seen, cursor = [], None
        while True:
            params = {"limit": 5}
            if cursor:
                params["starting_after"] = cursor
            code, page = self.c.get("/v1/events", params)
            self.assertEqual(code, 200)
            seen += [e["id"] for e in page["data"]]
            if not page["has_more"]:
                break
            cursor = page["data"][-1]["id"]
        self.assertEqual(len(seen), total)
        self.assertEqual(len(set(seen)), total)
        code, back = self.c.get("/v1/events", {"limit": 3, "ending_before": seen[5]})
        self.assertEqual([e["id"] for e in back["data"]], seen[2:5])
        _, _, other_key = new_account("events-other")
        other = Client(self.pd.port, other_key)
        code, err = other.get("/v1/events/" + seen[0])
        self.assertEqual((code, err["error"]["code"]), (404, "resource_missing"))
        code, page = other.get("/v1/events")
        self.assertEqual((code, page["data"]), (200, []))
        code, err = self.c.get("/v1/events", {"limit": 500})
        self.assertEqual((code, err["error"]["param"]), (400, "limit"))

    def test_a_refused_change_writes_no_event(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 300, "currency": "usd"})
        before = sql("SELECT count(*) FROM outbox WHERE aggregate_id = '%s'" % pi["id"])
        code, err = self.c.post("/v1/payment_intents/%s/capture" % pi["id"])
        self.assertEqual(code, 400)
        code, err = self.c.post("/v1/payment_intents/" + pi["id"], {"currency": "zzz"})
        self.assertEqual(code, 400)
        self.assertEqual(sql("SELECT count(*) FROM outbox WHERE aggregate_id = '%s'" % pi["id"]), before)


if __name__ == "__main__":
    unittest.main()
