"""The payments core over HTTP against real PostgreSQL, Redis and gatewaysim:
lifecycle, idempotency, account isolation, bad input, pagination, workers down."""
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import unittest

from harness import (BIN, Client, Gateway, Paymentd, free_port, migrate, new_account, sql,
                     wait_for)

gateway = None


def setUpModule():
    global gateway
    migrate()
    gateway = Gateway()


def tearDownModule():
    gateway.stop()


def intents_of(account_internal):
    return int(sql("SELECT count(*) FROM payment_intents WHERE account_id = %s" % account_internal)[0][0])


class PaymentsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pd = Paymentd(GATEWAY_URL=gateway.url, CONFIRM_WAIT_MS=5000).start()
        wait_for(lambda: cls.pd.json("/readyz")[0] == 200, 20, what="ready")
        cls.acct, cls.acct_id, cls.key = new_account("lifecycle")
        cls.c = Client(cls.pd.port, cls.key)

    @classmethod
    def tearDownClass(cls):
        cls.pd.cleanup()

    # ---- lifecycle ----

    def test_create_retrieve_update_confirm_succeeds(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 2000, "currency": "usd",
                                                      "customer": "cus_1", "description": "Order 1",
                                                      "metadata[order_id]": "42"})
        self.assertEqual(code, 200, pi)
        self.assertTrue(pi["id"].startswith("pi_"))
        for k, v in {"object": "payment_intent", "amount": 2000, "currency": "usd",
                     "status": "requires_payment_method", "livemode": False,
                     "metadata": {"order_id": "42"}, "capture_method": "automatic"}.items():
            self.assertEqual(pi[k], v, k)
        self.assertIsInstance(pi["created"], int)
        code, got = self.c.get("/v1/payment_intents/" + pi["id"])
        self.assertEqual((code, got["id"]), (200, pi["id"]))
        code, up = self.c.post("/v1/payment_intents/" + pi["id"],
                               {"amount": 2500, "metadata[note]": "x", "metadata[order_id]": "",
                                "payment_method": "pm_card_visa"})
        self.assertEqual(code, 200, up)
        self.assertEqual(up["amount"], 2500)
        self.assertEqual(up["metadata"], {"note": "x"})
        self.assertEqual(up["status"], "requires_confirmation")
        code, done = self.c.post("/v1/payment_intents/%s/confirm" % pi["id"])
        self.assertEqual(code, 200, done)
        self.assertEqual(done["status"], "succeeded")
        self.assertEqual(done["amount_received"], 2500)
        self.assertTrue(done["latest_charge"].startswith("ch_"))
        # The database agrees, with a transaction and the events.
        row = sql("SELECT status, amount_received, version FROM payment_intents WHERE public_id = '%s'" % pi["id"])[0]
        self.assertEqual(row[:2], ["succeeded", "2500"])
        tx = sql("SELECT t.type, t.status, t.amount FROM payment_transactions t JOIN payment_intents p"
                 " ON p.id = t.payment_intent_id WHERE p.public_id = '%s'" % pi["id"])
        self.assertEqual(tx, [["charge", "succeeded", "2500"]])
        events = [r[0] for r in sql("SELECT type FROM outbox WHERE aggregate_id = '%s' ORDER BY id" % pi["id"])]
        self.assertEqual(events, ["payment_intent.created", "payment_intent.succeeded"])
        # A succeeded intent cannot be confirmed, updated or canceled again.
        for path, params in (("/confirm", {}), ("", {"amount": 1}), ("/cancel", {})):
            code, err = self.c.post("/v1/payment_intents/%s%s" % (pi["id"], path), params)
            self.assertEqual(code, 400, path)
            self.assertEqual(err["error"]["code"], "payment_intent_unexpected_state")

    def test_create_and_confirm_in_one_call(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 1234, "currency": "jpy",
                                                      "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual(code, 200, pi)
        self.assertEqual(pi["status"], "succeeded")
        self.assertEqual(pi["amount_received"], 1234)

    def test_decline_is_a_402_card_error(self):
        for pm, decline in (("pm_card_chargeDeclined", "generic_decline"),
                            ("pm_card_insufficientFunds", "insufficient_funds")):
            code, err = self.c.post("/v1/payment_intents", {"amount": 500, "currency": "usd",
                                                           "payment_method": pm, "confirm": "true"})
            self.assertEqual(code, 402, err)
            e = err["error"]
            self.assertEqual((e["type"], e["code"], e["decline_code"]), ("card_error", "card_declined", decline))
            pi = e["payment_intent"]
            self.assertEqual(pi["status"], "requires_payment_method")
            self.assertEqual(pi["last_payment_error"]["decline_code"], decline)
            # The customer can try again with another card.
            code, ok = self.c.post("/v1/payment_intents/%s/confirm" % pi["id"], {"payment_method": "pm_card_visa"})
            self.assertEqual((code, ok["status"]), (200, "succeeded"))
            self.assertIsNone(ok["last_payment_error"])
            events = [r[0] for r in sql("SELECT type FROM outbox WHERE aggregate_id = '%s' ORDER BY id" % pi["id"])]
            self.assertEqual(events, ["payment_intent.created", "payment_intent.payment_failed",
                                      "payment_intent.succeeded"])

    def test_requires_action(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 900, "currency": "gbp",
                                                      "payment_method": "pm_card_authenticationRequired",
                                                      "confirm": "true"})
        self.assertEqual(code, 200, pi)
        self.assertEqual(pi["status"], "requires_action")
        self.assertIsNotNone(pi["next_action"])
        code, canceled = self.c.post("/v1/payment_intents/%s/cancel" % pi["id"],
                                     {"cancellation_reason": "abandoned"})
        self.assertEqual((code, canceled["status"], canceled["cancellation_reason"]),
                         (200, "canceled", "abandoned"))

    def test_manual_capture_partial(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 5000, "currency": "eur",
                                                      "payment_method": "pm_card_visa",
                                                      "capture_method": "manual", "confirm": "true"})
        self.assertEqual((code, pi["status"], pi["amount_capturable"]), (200, "requires_capture", 5000))
        code, err = self.c.post("/v1/payment_intents/%s/capture" % pi["id"], {"amount_to_capture": 6000})
        self.assertEqual(code, 400)
        self.assertEqual(err["error"]["param"], "amount_to_capture")
        code, cap = self.c.post("/v1/payment_intents/%s/capture" % pi["id"], {"amount_to_capture": 3000})
        self.assertEqual(code, 200, cap)
        self.assertEqual((cap["status"], cap["amount_received"], cap["amount_capturable"]),
                         ("succeeded", 3000, 0))
        charge = [c for c in gateway.ledger()["data"] if c["id"] == cap["latest_charge"]][0]
        self.assertEqual((charge["status"], charge["amount_captured"]), ("succeeded", 3000))
        code, err = self.c.post("/v1/payment_intents/%s/capture" % pi["id"])
        self.assertEqual(err["error"]["code"], "payment_intent_unexpected_state")

    def test_cancel_voids_an_authorization(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 700, "currency": "usd",
                                                      "payment_method": "pm_card_visa",
                                                      "capture_method": "manual", "confirm": "true"})
        self.assertEqual(pi["status"], "requires_capture")
        code, c = self.c.post("/v1/payment_intents/%s/cancel" % pi["id"],
                              {"cancellation_reason": "requested_by_customer"})
        self.assertEqual((code, c["status"]), (200, "canceled"), c)
        charge = [x for x in gateway.ledger()["data"] if x["id"] == pi["latest_charge"]][0]
        self.assertEqual(charge["status"], "canceled")
        code, err = self.c.post("/v1/payment_intents/%s/cancel" % pi["id"], {"cancellation_reason": "nope"})
        self.assertEqual((code, err["error"]["param"]), (400, "cancellation_reason"))

    def test_json_bodies_work_too(self):
        code, text, _ = self.c.call("POST", "/v1/payment_intents",
                                    json_body={"amount": 321, "currency": "USD", "metadata": {"k": "v"},
                                               "payment_method": "pm_card_visa", "confirm": True})
        pi = json.loads(text)
        self.assertEqual(code, 200, text)
        self.assertEqual((pi["currency"], pi["status"], pi["metadata"]), ("usd", "succeeded", {"k": "v"}))

    def test_metrics_follow_payments(self):
        import re
        code, pi = self.c.post("/v1/payment_intents", {"amount": 777, "currency": "usd",
                                                      "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual((code, pi["status"]), (200, "succeeded"))
        text = self.pd.metrics()

        def value(pattern):
            m = re.search("^" + re.escape(pattern) + r" (\d+)$", text, re.M)
            self.assertIsNotNone(m, pattern)
            return int(m.group(1))
        self.assertGreaterEqual(value('paymentd_payments_total{status="succeeded"}'), 1)
        self.assertGreaterEqual(value('paymentd_http_requests_total{route="payment_intents.create",code="200"}'), 1)
        self.assertGreaterEqual(value("paymentd_payment_duration_seconds_count"), 1)
        self.assertGreaterEqual(value("paymentd_payment_amount_count"), 1)
        self.assertGreaterEqual(value('paymentd_gateway_request_duration_seconds_count{provider="sim"}'), 1)
        self.assertIn("paymentd_active_payments ", text)
        self.assertIn('paymentd_http_request_duration_seconds_bucket{route="payment_intents.create",le="+Inf"}', text)

    # ---- authentication and isolation ----

    def test_missing_or_wrong_key_is_401(self):
        for key in (None, "sk_test_nope"):
            code, text, _ = Client(self.pd.port, key).call("GET", "/v1/payment_intents")
            self.assertEqual(code, 401)
            self.assertEqual(json.loads(text)["error"]["type"], "invalid_request_error")

    def test_another_accounts_intent_is_404_everywhere(self):
        _, _, key_b = new_account("other")
        b = Client(self.pd.port, key_b)
        code, pi = self.c.post("/v1/payment_intents", {"amount": 1000, "currency": "usd",
                                                      "payment_method": "pm_card_visa",
                                                      "capture_method": "manual"})
        self.assertEqual(code, 200)
        for method, path, params in (("GET", "", None), ("POST", "", {"amount": 5}),
                                     ("POST", "/confirm", {}), ("POST", "/capture", {}),
                                     ("POST", "/cancel", {})):
            code, text, _ = b.call(method, "/v1/payment_intents/%s%s" % (pi["id"], path), params)
            self.assertEqual(code, 404, (path, text))
            self.assertEqual(json.loads(text)["error"]["code"], "resource_missing")
        code, lst = b.get("/v1/payment_intents", {"limit": 100})
        self.assertNotIn(pi["id"], [x["id"] for x in lst["data"]])
        code, got = self.c.get("/v1/payment_intents/" + pi["id"])
        self.assertEqual((code, got["status"], got["amount"]), (200, "requires_confirmation", 1000))

    # ---- bad input ----

    def test_bad_input_names_the_field_and_writes_nothing(self):
        before = intents_of(self.acct_id)
        cases = [
            ({"amount": 0, "currency": "usd"}, "amount"),
            ({"amount": -5, "currency": "usd"}, "amount"),
            ({"amount": "12abc", "currency": "usd"}, "amount"),
            ({"amount": 100000000, "currency": "usd"}, "amount"),
            ({"currency": "usd"}, "amount"),
            ({"amount": 100}, "currency"),
            ({"amount": 100, "currency": "xyz"}, "currency"),
            ({"amount": 100, "currency": "usd", "colour": "red"}, "colour"),
            ({"amount": 100, "currency": "usd", "capture_method": "later"}, "capture_method"),
            ({"amount": 100, "currency": "usd", "confirm": "maybe"}, "confirm"),
            ({"amount": 100, "currency": "usd", "card[number]": "4242424242424242",
              "card[cvc]": "123"}, "card[number]"),
        ]
        for params, field in cases:
            code, err = self.c.post("/v1/payment_intents", params)
            self.assertEqual(code, 400, params)
            self.assertEqual(err["error"]["param"], field, params)
            self.assertNotIn("4242424242424242", json.dumps(err))
        for raw in ("amount=1&currency=usd&%zz=1", "amount=1&currency=usd&metadata[a=1"):
            code, text, _ = self.c.call("POST", "/v1/payment_intents", raw=raw)
            self.assertEqual(code, 400, raw)
        code, text, _ = self.c.call("POST", "/v1/payment_intents",
                                    raw='{"amount": 10', headers={"Content-Type": "application/json"})
        self.assertEqual(code, 400)
        code, text, _ = self.c.call("POST", "/v1/payment_intents", json_body={"amount": 10.5, "currency": "usd"})
        self.assertEqual((code, json.loads(text)["error"]["param"]), (400, "amount"))
        metadata = {"metadata[k%d]" % i: "v" for i in range(51)}
        code, err = self.c.post("/v1/payment_intents", dict(amount=1, currency="usd", **metadata))
        self.assertEqual((code, err["error"]["param"]), (400, "metadata"))
        code, err = self.c.post("/v1/payment_intents", {"amount": 1, "currency": "usd", "metadata[%s]" % ("k" * 41): "v"})
        self.assertEqual(code, 400)
        try:
            code, _, _ = self.c.call("POST", "/v1/payment_intents", raw="amount=1&currency=usd&description=" + "x" * (2 << 20))
            self.assertEqual(code, 413)
        except (ConnectionError, OSError):
            pass  # the server may close the connection while the client still writes
        self.assertEqual(intents_of(self.acct_id), before)
        self.assertEqual(self.pd.http("/healthz")[0], 200)

    # ---- pagination ----

    def test_pagination_forwards_and_backwards(self):
        _, _, key = new_account("pages")
        c = Client(self.pd.port, key)
        made = []
        for i in range(250):
            code, pi = c.post("/v1/payment_intents", {"amount": 100 + i, "currency": "usd",
                                                     "customer": "cus_even" if i % 2 == 0 else "cus_odd"})
            self.assertEqual(code, 200)
            made.append(pi["id"])
        newest_first = list(reversed(made))
        seen, cursor = [], None
        while True:
            params = {"limit": 7}
            if cursor:
                params["starting_after"] = cursor
            code, page = c.get("/v1/payment_intents", params)
            self.assertEqual(code, 200, page)
            self.assertEqual((page["object"], page["url"]), ("list", "/v1/payment_intents"))
            seen += [x["id"] for x in page["data"]]
            if not page["has_more"]:
                break
            self.assertEqual(len(page["data"]), 7)
            cursor = page["data"][-1]["id"]
        self.assertEqual(seen, newest_first)
        back = []
        # Backwards from the oldest: ending_before walks towards the newest.
        cursor = made[0]
        while True:
            code, page = c.get("/v1/payment_intents", {"limit": 7, "ending_before": cursor})
            self.assertEqual(code, 200)
            back = [x["id"] for x in page["data"]] + back
            if not page["has_more"]:
                break
            cursor = page["data"][0]["id"]
        self.assertEqual(back, newest_first[:-1])
        code, page = c.get("/v1/payment_intents", {"limit": 100, "customer": "cus_odd"})
        self.assertEqual(len(page["data"]), 100)
        self.assertTrue(all(x["customer"] == "cus_odd" for x in page["data"]))
        code, page = c.get("/v1/payment_intents", {"limit": 0})
        self.assertEqual((code, page["error"]["param"]), (400, "limit"))
        code, page = c.get("/v1/payment_intents", {"starting_after": "pi_unknown"})
        self.assertEqual(code, 400)
        now = int(time.time())
        code, page = c.get("/v1/payment_intents", {"created[gt]": now + 100})
        self.assertEqual((code, page["data"]), (200, []))
        code, page = c.get("/v1/payment_intents", {"created[gte]": now - 600, "limit": 3})
        self.assertEqual(len(page["data"]), 3)


class IdempotencyTest(unittest.TestCase):
    """50 concurrent identical requests under one key: one intent, one charge."""

    def setUp(self):
        self.redis_port = free_port()
        self.redis = subprocess.Popen(["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        self.addCleanup(self.redis.wait)
        self.addCleanup(self.redis.terminate)
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(self.redis_port), "ping"],
                                        capture_output=True).returncode == 0, 10, what="redis")

    def start(self, redis_port):
        pd = Paymentd(GATEWAY_URL=gateway.url, REDIS_PORT=redis_port, CONFIRM_WAIT_MS=10000)
        self.addCleanup(pd.cleanup)
        pd.start()
        _, acct_id, key = new_account("idem")
        return pd, acct_id, Client(pd.port, key)

    def burst(self, client, key, midway=None, n=50):
        results = [None] * n
        barrier = threading.Barrier(n)

        def one(i):
            barrier.wait()
            if midway and i == n // 2:
                midway()
            results[i] = client.call("POST", "/v1/payment_intents",
                                     {"amount": 4242, "currency": "usd", "payment_method": "pm_card_visa",
                                      "confirm": "true"}, idem=key)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results

    def check(self, client, acct_id, key, results):
        ok = [r for r in results if r[0] == 200]
        conflicts = [r for r in results if r[0] == 409]
        self.assertEqual(len(ok) + len(conflicts), len(results), [r[:2] for r in results if r[0] not in (200, 409)])
        self.assertGreaterEqual(len(ok), 1)
        self.assertEqual(len({r[1] for r in ok}), 1, "every 200 answer is byte-for-byte the same")
        for _, text, _ in conflicts:
            self.assertEqual(json.loads(text)["error"]["type"], "idempotency_error")
        pi = json.loads(ok[0][1])
        self.assertEqual(pi["status"], "succeeded")
        self.assertEqual(sql("SELECT count(*) FROM payment_intents WHERE account_id = %s" % acct_id), [["1"]])
        charges = [c for c in gateway.ledger()["data"] if c["id"] == pi["latest_charge"]]
        self.assertEqual(len(charges), 1)
        self.assertEqual(int(sql("SELECT count(*) FROM payment_transactions t JOIN payment_intents p ON"
                                 " p.id = t.payment_intent_id WHERE p.account_id = %s" % acct_id)[0][0]), 1)
        # Later retries get the same bytes back, marked as replays.
        code, text, headers = client.call("POST", "/v1/payment_intents",
                                          {"amount": 4242, "currency": "usd", "payment_method": "pm_card_visa",
                                           "confirm": "true"}, idem=key)
        self.assertEqual((code, text), (200, ok[0][1]))
        self.assertEqual(headers.get("Idempotent-Replayed"), "true")
        # The same key with other parameters: 400 and nothing written.
        code, text, _ = client.call("POST", "/v1/payment_intents", {"amount": 1, "currency": "usd"}, idem=key)
        self.assertEqual(code, 400)
        self.assertEqual(json.loads(text)["error"]["type"], "idempotency_error")
        self.assertEqual(sql("SELECT count(*) FROM payment_intents WHERE account_id = %s" % acct_id), [["1"]])

    def test_with_redis(self):
        pd, acct_id, c = self.start(self.redis_port)
        self.check(c, acct_id, "key-redis", self.burst(c, "key-redis"))

    def test_keys_that_are_not_utf8_text_are_refused(self):
        """A key that could not be stored could not be honoured: 400, nothing made."""
        pd, acct_id, c = self.start(self.redis_port)
        for key in ("caf\xe9-latin1", "tab\there", "bell\x07"):
            for _ in range(2):
                code, text, _ = c.call("POST", "/v1/payment_intents",
                                       {"amount": 4242, "currency": "usd", "payment_method": "pm_card_visa",
                                        "confirm": "true"}, idem=key)
                self.assertEqual(code, 400, text)
                self.assertEqual(json.loads(text)["error"]["code"], "idempotency_key_invalid")
        self.assertEqual(sql("SELECT count(*) FROM payment_intents WHERE account_id = %s" % acct_id), [["0"]])
        code, text, _ = c.call("POST", "/v1/payment_intents", {"amount": 4242, "currency": "usd"},
                               idem="caf\u00e9-utf8".encode().decode("latin-1"))
        self.assertEqual(code, 200, text)

    def test_with_redis_stopped(self):
        pd, acct_id, c = self.start(free_port())  # nothing listens there
        code, body = pd.json("/readyz")
        self.assertEqual((code, body["status"]), (200, "degraded"), body)
        self.check(c, acct_id, "key-no-redis", self.burst(c, "key-no-redis"))

    def test_with_redis_flushed_halfway(self):
        pd, acct_id, c = self.start(self.redis_port)
        flush = lambda: subprocess.run(["redis-cli", "-p", str(self.redis_port), "flushall"],
                                       capture_output=True)
        self.check(c, acct_id, "key-flushed", self.burst(c, "key-flushed", midway=flush))
        flush()
        code, text, headers = c.call("POST", "/v1/payment_intents",
                                     {"amount": 4242, "currency": "usd", "payment_method": "pm_card_visa",
                                      "confirm": "true"}, idem="key-flushed")
        self.assertEqual(code, 200)
        self.assertEqual(headers.get("Idempotent-Replayed"), "true")


class WorkersDownTest(unittest.TestCase):
    def test_intake_keeps_going_and_payments_finish_later(self):
        pd = Paymentd(GATEWAY_URL=gateway.url, CONFIRM_WAIT_MS=500)
        self.addCleanup(pd.cleanup)
        pd.start()
        _, _, key = new_account("down")
        c = Client(pd.port, key)
        pd.ctl("stop", "worker")
        wait_for(lambda: all(r["state"] == "stopped" for r in pd.status() if r["role"] == "worker"),
                 10, what="workers stopped")
        timings, pending = [], []
        for i in range(10):
            t0 = time.monotonic()
            code, pi = c.post("/v1/payment_intents", {"amount": 100 + i, "currency": "usd"})
            timings.append(time.monotonic() - t0)
            self.assertEqual(code, 200)
            t0 = time.monotonic()
            code, got = c.get("/v1/payment_intents/" + pi["id"])
            timings.append(time.monotonic() - t0)
            self.assertEqual(code, 200)
            code, conf = c.post("/v1/payment_intents/%s/confirm" % pi["id"], {"payment_method": "pm_card_visa"})
            self.assertEqual((code, conf["status"]), (200, "processing"))
            pending.append(pi["id"])
        timings.sort()
        self.assertLess(timings[len(timings) // 2], 0.1, timings)  # median well under 100 ms
        self.assertLess(timings[-1], 2.0, timings)
        pd.ctl("start", "worker")

        def all_done():
            rows = sql("SELECT status FROM payment_intents WHERE public_id IN (%s)" %
                       ",".join("'%s'" % p for p in pending))
            return all(r[0] == "succeeded" for r in rows) and len(rows) == len(pending)
        wait_for(all_done, 60, interval=0.5, what="every pending payment succeeded")


if __name__ == "__main__":
    unittest.main()


class GatewayFaultsTest(unittest.TestCase):
    """Gateway failures never charge twice: an ambiguous timeout is retried with
    the same idempotency key, a 503 before processing charges nothing."""

    def setUp(self):
        self.gw = Gateway()
        self.addCleanup(self.gw.stop)
        self.pd = Paymentd(GATEWAY_URL=self.gw.url, GATEWAY_TIMEOUT_MS=300, CONFIRM_WAIT_MS=8000)
        self.addCleanup(self.pd.cleanup)
        self.pd.start()
        _, _, key = new_account("faults")
        self.c = Client(self.pd.port, key)

    def charges_of(self, pi):
        return [ch for ch in self.gw.ledger()["data"] if (ch.get("idempotency_key") or "").startswith(pi + ":")]

    def test_timeouts_after_the_charge_never_double_charge(self):
        self.gw.configure(timeout_rate=100)
        code, pi = self.c.post("/v1/payment_intents", {"amount": 1500, "currency": "usd",
                                                      "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual((code, pi["status"]), (200, "processing"), pi)
        # Every retry used the same key: the gateway charged exactly once.
        self.assertEqual(len(self.charges_of(pi["id"])), 1)
        self.assertIn("retry", self.pd.logs())

    def test_unavailable_gateway_charges_nothing_and_retries(self):
        self.gw.configure(fail_rate=100)
        code, pi = self.c.post("/v1/payment_intents", {"amount": 1500, "currency": "usd",
                                                      "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual((code, pi["status"]), (200, "processing"), pi)
        self.assertEqual(self.charges_of(pi["id"]), [])
        # A flaky gateway: the retries get through, still one charge per payment.
        self.gw.configure(fail_rate=30)
        for i in range(10):
            code, p = self.c.post("/v1/payment_intents", {"amount": 100 + i, "currency": "usd",
                                                         "payment_method": "pm_card_visa", "confirm": "true"})
            self.assertEqual(code, 200)
            self.assertIn(p["status"], ("succeeded", "processing"))
            self.assertLessEqual(len(self.charges_of(p["id"])), 1)
            if p["status"] == "succeeded":
                self.assertEqual(len(self.charges_of(p["id"])), 1)


class RateLimitedGatewayTest(unittest.TestCase):
    def test_429_retry_after_is_honoured(self):
        gw = Gateway()
        self.addCleanup(gw.stop)
        pd = Paymentd(GATEWAY_URL=gw.url, CONFIRM_WAIT_MS=10000)
        self.addCleanup(pd.cleanup)
        pd.start()
        _, _, key = new_account("ratelimited")
        c = Client(pd.port, key)
        gw.configure(rate_limit_rate=100)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=c.post(
            "/v1/payment_intents", {"amount": 300, "currency": "usd", "payment_method": "pm_card_visa",
                                    "confirm": "true"})))
        t0 = time.monotonic()
        t.start()
        time.sleep(0.5)
        gw.configure(rate_limit_rate=0)
        t.join(20)
        code, pi = result["r"]
        self.assertEqual((code, pi["status"]), (200, "succeeded"))
        self.assertGreaterEqual(time.monotonic() - t0, 0.9)  # it waited as the gateway asked
        self.assertIn("retry 1 in 1000 ms", pd.logs())
        charges = [ch for ch in gw.ledger()["data"] if (ch.get("idempotency_key") or "").startswith(pi["id"])]
        self.assertEqual(len(charges), 1)


class BackPressureTest(unittest.TestCase):
    """With MAX_PENDING_JOBS gateway jobs in flight, a confirm answers 503 with
    Retry-After at once and writes nothing, instead of queueing without bound."""

    def test_full_job_queue_answers_503(self):
        slow = Gateway("--latency-ms", "2000")
        self.addCleanup(slow.stop)
        pd = Paymentd(GATEWAY_URL=slow.url, API_PROCESSES=1, MAX_PENDING_JOBS=2, CONFIRM_WAIT_MS=10000)
        self.addCleanup(pd.cleanup)
        pd.start()
        _, acct_id, key = new_account("pressure")
        c = Client(pd.port, key)
        results = [None] * 6

        def one(i):
            results[i] = c.call("POST", "/v1/payment_intents", {"amount": 100 + i, "currency": "usd",
                                                                "payment_method": "pm_card_visa", "confirm": "true"})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        ok = [r for r in results if r[0] == 200]
        busy = [r for r in results if r[0] == 503]
        self.assertEqual(len(ok) + len(busy), 6, [r[:2] for r in results])
        self.assertEqual(len(ok), 2)
        for code, text, headers in busy:
            self.assertEqual(headers.get("Retry-After"), "1")
            self.assertEqual(json.loads(text)["error"]["code"], "overloaded")
        self.assertEqual(sql("SELECT count(*) FROM payment_intents WHERE account_id = %s" % acct_id), [["2"]])
        # Once the jobs are answered there is room again.
        code, pi = c.post("/v1/payment_intents", {"amount": 999, "currency": "usd",
                                                 "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual((code, pi["status"]), (200, "succeeded"))


class DatabaseDownTest(unittest.TestCase):
    def test_writes_answer_503_quickly_and_healthz_stays_up(self):
        pd = Paymentd(POSTGRES_PORT=free_port())  # nothing listens there
        self.addCleanup(pd.cleanup)
        pd.start()
        c = Client(pd.port, "sk_test_any")
        for path, params in (("/v1/payment_intents", {"amount": 100, "currency": "usd"}),):
            t0 = time.monotonic()
            code, text, headers = c.call("POST", path, params)
            self.assertLess(time.monotonic() - t0, 1.5)
            self.assertEqual(code, 503, text)
            self.assertEqual(headers.get("Retry-After"), "1")
            self.assertEqual(json.loads(text)["error"]["type"], "api_error")
        self.assertEqual(pd.http("/healthz")[0], 200)


class BreakerTest(unittest.TestCase):
    """Gateway down: the breaker opens, confirms answer processing at once
    without calling, one probe closes it when the gateway is back, and every
    waiting payment completes with one charge."""

    def test_gateway_down_then_back(self):
        gw = Gateway()
        port = gw.port
        pd = Paymentd(GATEWAY_URL=gw.url, BREAKER_FAILURES=3, BREAKER_OPEN_MS=1500, GATEWAY_MAX_ATTEMPTS=1,
                      GATEWAY_TIMEOUT_MS=500, DB_STATEMENT_TIMEOUT_MS=1000, PROCESSING_LEASE_MS=2500,
                      SWEEP_INTERVAL_MS=300,
                      CONFIRM_WAIT_MS=5000)
        self.addCleanup(pd.cleanup)
        pd.start()
        _, _, key = new_account("breaker")
        c = Client(pd.port, key)
        gw.stop()  # connections refused from now on
        pay = lambda: c.post("/v1/payment_intents", {"amount": 250, "currency": "usd",
                                                    "payment_method": "pm_card_visa", "confirm": "true"})
        waiting = []
        for _ in range(3):
            code, pi = pay()
            self.assertEqual((code, pi["status"]), (200, "processing"))
            waiting.append(pi["id"])

        def state():
            for line in pd.metrics().splitlines():
                if line.startswith('paymentd_circuit_breaker_state{provider="sim"}'):
                    return int(line.split()[-1])
        wait_for(lambda: state() == 1, 10, what="breaker open")
        code, body = pd.json("/readyz")
        self.assertEqual((code, body["status"], body["checks"]["gateways"]), (200, "degraded", {"sim": "open"}))
        t0 = time.monotonic()
        code, pi = pay()
        self.assertEqual((code, pi["status"]), (200, "processing"))
        self.assertLess(time.monotonic() - t0, 1.0)  # refused without calling the gateway
        waiting.append(pi["id"])
        self.assertEqual(pd.http("/healthz")[0], 200)
        back = Gateway(port=port)
        self.addCleanup(back.stop)

        def all_done():
            rows = sql("SELECT status FROM payment_intents WHERE public_id IN (%s)" %
                       ",".join("'%s'" % p for p in waiting))
            return len(rows) == len(waiting) and all(r[0] == "succeeded" for r in rows)
        wait_for(all_done, 30, interval=0.3, what="waiting payments completed after the gateway returned")
        self.assertEqual(state(), 0)
        for p in waiting:
            self.assertEqual(len([ch for ch in back.ledger()["data"]
                                  if (ch.get("idempotency_key") or "").startswith(p + ":")]), 1)
        self.assertIn("circuit breaker sim: closed -> open", pd.logs())


class ClaimTakeoverTest(unittest.TestCase):
    """An api process killed while it holds an idempotency key: the retry is
    taken over at once (the holder is certainly gone) and answers with the
    payment the first request started, never a second one; a holder that may
    be alive elsewhere still gets 409."""

    def test_dead_holder_is_taken_over(self):
        slow = Gateway("--latency-ms", "3000")
        self.addCleanup(slow.stop)
        pd = Paymentd(GATEWAY_URL=slow.url, API_PROCESSES=1, CONFIRM_WAIT_MS=20000)
        self.addCleanup(pd.cleanup)
        pd.start()
        _, acct_id, key = new_account("takeover")
        c = Client(pd.port, key)
        _, pi = c.post("/v1/payment_intents", {"amount": 1234, "currency": "usd", "payment_method": "pm_card_visa"})
        confirm = "/v1/payment_intents/%s/confirm" % pi["id"]
        threading.Thread(target=lambda: self.swallow(c, confirm), daemon=True).start()
        wait_for(lambda: sql("SELECT count(*) FROM idempotency_keys WHERE idempotency_key = 'held-1'"
                             " AND locked_by IS NOT NULL AND account_id = %s" % acct_id)[0][0] == "1", 10,
                 what="claim held")
        wait_for(lambda: sql("SELECT status FROM payment_intents WHERE public_id = '%s'" % pi["id"])[0][0]
                 == "processing", 10, what="confirm started")
        api = [r for r in pd.status() if r["role"] == "api"][0]
        os.kill(api["pid"], signal.SIGKILL)
        wait_for(lambda: any(r["role"] == "api" and r["state"] == "running" and r["pid"] != api["pid"]
                             for r in pd.status()), 20, what="api restarted")
        t0 = time.monotonic()
        code, body = wait_for(lambda: (lambda r: r if r[0] != 503 else None)(c.post(confirm, {}, idem="held-1")),
                              10, what="retry answered")
        self.assertLess(time.monotonic() - t0, 10)
        self.assertEqual(code, 200, body)
        self.assertEqual(body["id"], pi["id"])
        self.assertIn("its api process is gone", pd.logs())
        wait_for(lambda: c.get("/v1/payment_intents/" + pi["id"])[1]["status"] == "succeeded", 30,
                 interval=0.3, what="payment completed")
        self.assertEqual(len([ch for ch in slow.ledger()["data"]
                              if (ch.get("idempotency_key") or "").startswith(pi["id"] + ":")]), 1)
        self.assertEqual(intents_of(acct_id), 1)
        # A claim held by a process on another machine may still be running: 409.
        _, pi2 = c.post("/v1/payment_intents", {"amount": 99, "currency": "usd"})
        update = ("/v1/payment_intents/%s" % pi2["id"], {"description": "x"})
        self.assertEqual(c.post(*update, idem="held-2")[0], 200)
        sql("UPDATE idempotency_keys SET response_code = NULL, response_body = NULL, locked_at = now(),"
            " locked_by = 'another-boot-id/1/1' WHERE idempotency_key = 'held-2'"
            " AND account_id = %s" % acct_id)
        subprocess.run(["redis-cli", "-p", os.environ.get("REDIS_PORT", "6379"), "DEL", "idem:%s:%s" % (
            acct_id, hashlib.sha256(b"held-2").hexdigest()[:32])], check=True, capture_output=True)
        code, body = c.post(*update, idem="held-2")
        self.assertEqual(code, 409, body)

    @staticmethod
    def swallow(c, path):
        try:
            c.post(path, {}, idem="held-1")
        except Exception:
            pass  # the api is killed under this request


class FailoverTest(unittest.TestCase):
    """Two providers in priority order: a payment moves to the second only
    when the first certainly did not take it; after an ambiguous failure it
    stays with the first and is resolved there with the same key."""

    def charges_for(self, gw, payment):
        return [ch for ch in gw.ledger()["data"]
                if (ch.get("idempotency_key") or "").startswith(payment + ":")]

    def start(self, a, b, **kw):
        pd = Paymentd(GATEWAY_PROVIDERS="sim_a,sim_b", GATEWAY_URL="%s,%s" % (a.url, b.url),
                      GATEWAY_KEY="key-a,key-b", GATEWAY_TIMEOUT_MS=500, CONFIRM_WAIT_MS=5000, **kw)
        self.addCleanup(pd.cleanup)
        pd.start()
        return pd

    def test_certain_failure_moves_to_the_next_provider(self):
        a = Gateway("--key", "key-a")
        a.stop()  # connections refused: certainly not processed
        b = Gateway("--key", "key-b")
        self.addCleanup(b.stop)
        pd = self.start(a, b)
        _, _, key = new_account("failover")
        c = Client(pd.port, key)
        code, pi = c.post("/v1/payment_intents", {"amount": 700, "currency": "usd",
                                                 "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual((code, pi["status"]), (200, "succeeded"), pi)
        self.assertEqual(len(self.charges_for(b, pi["id"])), 1)
        self.assertEqual(sql("SELECT gateway_provider FROM payment_intents WHERE public_id = '%s'" % pi["id"]),
                         [["sim_b"]])
        self.assertEqual(sql("SELECT t.gateway_provider, t.status FROM payment_transactions t JOIN payment_intents p"
                             " ON p.id = t.payment_intent_id WHERE p.public_id = '%s'" % pi["id"]),
                         [["sim_b", "succeeded"]])
        self.assertIn("failing over to sim_b", pd.logs())
        self.assertRegex(pd.metrics(), r"paymentd_gateway_failovers_total [1-9]")
        # A wrong key is the provider refusing us, not a decline: the next one takes it.
        a2 = Gateway("--key", "another-key")
        self.addCleanup(a2.stop)
        pd2 = Paymentd(GATEWAY_PROVIDERS="sim_a,sim_b", GATEWAY_URL="%s,%s" % (a2.url, b.url),
                       GATEWAY_KEY="key-a,key-b", CONFIRM_WAIT_MS=5000)
        self.addCleanup(pd2.cleanup)
        pd2.start()
        code, pi = Client(pd2.port, key).post("/v1/payment_intents", {
            "amount": 701, "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual((code, pi["status"]), (200, "succeeded"), pi)
        self.assertEqual(len(self.charges_for(b, pi["id"])), 1)
        self.assertEqual(a2.ledger()["charges"], 0)

    def test_ambiguous_failure_stays_with_the_same_provider(self):
        a = Gateway("--key", "key-a")
        b = Gateway("--key", "key-b")
        for g in (a, b):
            self.addCleanup(g.stop)
        # Its timeouts open sim_a's breaker: an open breaker must not move a
        # payment that sim_a may hold. One worker, so that the charge below
        # goes over the keep-alive connection the first payment opened (a
        # timeout there has no connect time, and must still count as sent).
        # The lease covers a job's worst case: 3 calls of 500 ms, one back-off
        # of 100 ms, 4 statements of 500 ms.
        pd = self.start(a, b, GATEWAY_MAX_ATTEMPTS=2, GATEWAY_RETRY_CAP_MS=100, DB_STATEMENT_TIMEOUT_MS=500,
                        PROCESSING_LEASE_MS=3600, SWEEP_INTERVAL_MS=300, BREAKER_FAILURES=2,
                        BREAKER_OPEN_MS=6000, WORKERS=1)
        _, _, key = new_account("ambiguous")
        c = Client(pd.port, key)
        code, warm = c.post("/v1/payment_intents", {"amount": 100, "currency": "usd",
                                                   "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual((code, warm["status"]), (200, "succeeded"), warm)
        a.configure(timeout_rate=100)  # takes the charge, never answers
        code, pi = c.post("/v1/payment_intents", {"amount": 900, "currency": "usd",
                                                 "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual((code, pi["status"]), (200, "processing"), pi)
        self.assertEqual(len(self.charges_for(a, pi["id"])), 1)  # a took it; the answer was lost
        self.assertEqual(self.charges_for(b, pi["id"]), [])
        wait_for(lambda: 'paymentd_circuit_breaker_state{provider="sim_a"} 1' in pd.metrics(), 20,
                 interval=0.3, what="sim_a's breaker open")
        time.sleep(4.5)  # the sweep re-drives it while the breaker is open: it stays with sim_a
        self.assertEqual(self.charges_for(b, pi["id"]), [])
        self.assertIn("was pending past its lease", pd.logs())
        self.assertEqual(sql("SELECT status, gateway_provider FROM payment_intents WHERE public_id = '%s'" % pi["id"]),
                         [["processing", "sim_a"]])
        a.configure(timeout_rate=0)
        wait_for(lambda: c.get("/v1/payment_intents/" + pi["id"])[1]["status"] == "succeeded", 30,
                 interval=0.3, what="resolved at sim_a with the same key")
        self.assertEqual(len(self.charges_for(a, pi["id"])), 1)
        self.assertEqual(self.charges_for(b, pi["id"]), [])
        self.assertNotIn("failing over", pd.logs())
