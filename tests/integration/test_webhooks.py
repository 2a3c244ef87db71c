"""Merchant webhooks: the endpoints API, signed deliveries that the official
stripe package verifies, retries until the receiver answers, an endpoint
disabled after failing for the whole retry window, and no delivery to
private addresses unless allowed."""
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import unittest

from harness import SOURCE, Client, Gateway, Paymentd, free_port, migrate, new_account, sql, wait_for


class Receiver:
    """An HTTP server on 127.0.0.1 that records requests and fails the first N."""

    def __init__(self, fail_first=0, port=None):
        self.requests, self.fail_first = [], fail_first
        self.port = port or free_port()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                code = 500 if len(outer.requests) <= outer.fail_first else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d/hook" % self.port

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class WebhooksTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        migrate()
        cls.gw = Gateway()
        cls.pd = Paymentd(GATEWAY_URL=cls.gw.url, WEBHOOK_ALLOW_PRIVATE=1, OUTBOX_POLL_MS=200,
                          WEBHOOK_TIMEOUT_MS=2000).start()
        wait_for(lambda: cls.pd.json("/readyz")[0] == 200, 20, what="ready")

    @classmethod
    def tearDownClass(cls):
        cls.pd.cleanup()
        cls.gw.stop()

    def setUp(self):
        _, self.acct_id, key = new_account("hooks")
        self.c = Client(self.pd.port, key)

    def endpoint(self, url, events=("*",)):
        params = {"url": url}
        for i, e in enumerate(events):
            params["enabled_events[%d]" % i] = e
        code, we = self.c.post("/v1/webhook_endpoints", params)
        self.assertEqual(code, 200, we)
        return we

    def pay(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 4200, "currency": "usd",
                                                      "payment_method": "pm_card_visa", "confirm": "true"})
        self.assertEqual(code, 200)
        return pi["id"]

    def test_endpoints_api(self):
        we = self.endpoint("https://merchant.example/hooks", ["payment_intent.succeeded"])
        self.assertTrue(we["id"].startswith("we_"))
        self.assertTrue(we["secret"].startswith("whsec_"))
        self.assertEqual((we["object"], we["status"], we["enabled_events"]),
                         ("webhook_endpoint", "enabled", ["payment_intent.succeeded"]))
        code, got = self.c.get("/v1/webhook_endpoints/" + we["id"])
        self.assertEqual((code, got["secret"]), (200, None))  # shown once
        code, up = self.c.post("/v1/webhook_endpoints/" + we["id"], {"disabled": "true", "description": "x"})
        self.assertEqual((code, up["status"], up["description"]), (200, "disabled", "x"))
        code, lst = self.c.get("/v1/webhook_endpoints")
        self.assertEqual([e["id"] for e in lst["data"]], [we["id"]])
        code, _, _ = self.c.call("DELETE", "/v1/webhook_endpoints/" + we["id"])
        self.assertEqual(code, 200)
        self.assertEqual(self.c.get("/v1/webhook_endpoints/" + we["id"])[0], 404)
        code, err = self.c.post("/v1/webhook_endpoints", {"url": "ftp://x/", "enabled_events[0]": "*"})
        self.assertEqual((code, err["error"]["param"]), (400, "url"))
        code, err = self.c.post("/v1/webhook_endpoints", {"url": "https://x.example/", "enabled_events[0]": "nope"})
        self.assertEqual((code, err["error"]["param"]), (400, "enabled_events"))

    def test_private_addresses_are_refused_unless_allowed(self):
        pd = Paymentd(GATEWAY_URL=self.gw.url)  # WEBHOOK_ALLOW_PRIVATE unset
        self.addCleanup(pd.cleanup)
        pd.start()
        _, _, key = new_account("ssrf")
        c = Client(pd.port, key)
        for url in ("http://127.0.0.1:8080/x", "http://localhost/x", "https://10.1.2.3/",
                    "http://192.168.0.1/", "http://169.254.169.254/latest/meta-data",
                    "http://[::1]/x", "http://0x7f.1/", "http://2130706433/"):
            code, err = c.post("/v1/webhook_endpoints", {"url": url, "enabled_events[0]": "*"})
            self.assertEqual((code, err["error"]["param"]), (400, "url"), url)
        code, we = c.post("/v1/webhook_endpoints", {"url": "https://merchant.example/h", "enabled_events[0]": "*"})
        self.assertEqual(code, 200)

    def test_signed_delivery_verified_by_the_stripe_library_after_retries(self):
        rx = Receiver(fail_first=3)
        self.addCleanup(rx.close)
        we = self.endpoint(rx.url, ["payment_intent.succeeded"])
        pi = self.pay()
        wait_for(lambda: len(rx.requests) >= 4, 40, interval=0.2, what="fourth try delivered")
        time.sleep(0.5)
        self.assertEqual(len(rx.requests), 4)
        bodies = {json.loads(b)["id"] for _, b in rx.requests}
        self.assertEqual(len(bodies), 1)  # the same event every time
        headers, body = rx.requests[-1]
        event = json.loads(body)
        self.assertEqual((event["type"], event["data"]["object"]["id"]), ("payment_intent.succeeded", pi))
        self.assertEqual(headers["Payments-Signature"], headers["Stripe-Signature"])
        values = dict(line.split() for line in self.pd.metrics().splitlines()
                      if line.startswith("paymentd_webhook_delivery_"))
        self.assertGreaterEqual(int(values["paymentd_webhook_delivery_attempts_total"]), 4)
        self.assertGreaterEqual(int(values["paymentd_webhook_delivery_failures_total"]), 3)
        row = sql("SELECT d.status, d.attempts FROM webhook_deliveries d JOIN webhook_endpoints w ON"
                  " w.id = d.endpoint_id WHERE w.public_id = '%s'" % we["id"])
        self.assertEqual(row, [["delivered", "4"]])
        node = shutil.which("node")
        if not node:
            self.skipTest("node is not installed")
        script = ("const Stripe = require('stripe'); const s = new Stripe('sk_test_x');"
                  "const e = s.webhooks.constructEvent(process.env.BODY, process.env.SIG, process.env.SECRET);"
                  "console.log(e.id);")
        r = subprocess.run([node, "-e", script], cwd=os.path.join(SOURCE, "tests", "node"), capture_output=True,
                           text=True, timeout=60, env=dict(os.environ, BODY=body.decode(),
                                                           SIG=headers["Payments-Signature"], SECRET=we["secret"]))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), event["id"])
        bad = subprocess.run([node, "-e", script], cwd=os.path.join(SOURCE, "tests", "node"), capture_output=True,
                             text=True, timeout=60, env=dict(os.environ, BODY=body.decode() + " ",
                                                             SIG=headers["Payments-Signature"], SECRET=we["secret"]))
        self.assertNotEqual(bad.returncode, 0)  # a tampered body does not verify

    def test_receiver_down_for_a_while_gets_everything(self):
        port = free_port()
        we = self.endpoint("http://127.0.0.1:%d/hook" % port)
        pis = [self.pay() for _ in range(3)]
        time.sleep(1.5)  # tries fail: nothing listens yet
        rx = Receiver(port=port)
        self.addCleanup(rx.close)
        expected = {r[0] for r in sql("SELECT event_id FROM outbox WHERE aggregate_id IN (%s)" %
                                      ",".join("'%s'" % p for p in pis))}
        wait_for(lambda: expected <= {json.loads(b)["id"] for _, b in rx.requests}, 40, interval=0.3,
                 what="every event delivered once the receiver is up")

    def test_endpoint_failing_for_the_whole_window_is_disabled(self):
        # Only this test's dispatcher, with its short window, may take the
        # deliveries: the class's own instance would retry them for 3 days.
        self.pd.ctl("stop", "outbox")
        self.addCleanup(self.pd.ctl, "start", "outbox")
        pd = Paymentd(GATEWAY_URL=self.gw.url, WEBHOOK_ALLOW_PRIVATE=1, OUTBOX_POLL_MS=200,
                      WEBHOOK_RETRY_WINDOW="3s")
        self.addCleanup(pd.cleanup)
        pd.start()
        _, _, key = new_account("hooks-window")
        self.c = Client(pd.port, key)
        rx = Receiver(fail_first=10 ** 6)
        self.addCleanup(rx.close)
        we = self.endpoint(rx.url)
        self.pay()
        wait_for(lambda: self.c.get("/v1/webhook_endpoints/" + we["id"])[1]["status"] == "disabled", 60,
                 interval=0.5, what="endpoint disabled")
        code, evs = self.c.get("/v1/events", {"type": "webhook_endpoint.disabled"})
        self.assertEqual([e["data"]["object"]["id"] for e in evs["data"]], [we["id"]])
        self.assertEqual(sql("SELECT count(*) FROM webhook_deliveries d JOIN webhook_endpoints w ON"
                             " w.id = d.endpoint_id WHERE w.public_id = '%s' AND d.status IN ('pending', 'failed')"
                             % we["id"]), [["0"]])


if __name__ == "__main__":
    unittest.main()
