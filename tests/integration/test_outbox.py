"""The outbox dispatcher: events reach an NNG subscriber in order per
payment, at least once, with the same event id when published again;
nothing is lost while the dispatcher is down; two dispatchers share the
work; a rolled-back change publishes nothing."""
import json
import os
import queue
import signal
import subprocess
import threading
import time
import unittest

from harness import BIN, Client, Gateway, Paymentd, migrate, new_account, sql, wait_for


class Subscriber:
    """paymentctl subscribe in the background, lines collected in a queue."""

    def __init__(self, pd, url=None, topic="all"):
        env = {k: v for k, v in pd.env.items() if k != "RUN_DIR"}
        if url:
            env["EVENTS_URL"] = url
        self.proc = subprocess.Popen([os.path.join(BIN, "paymentctl"), "--run-dir", pd.run_dir, "subscribe", topic],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.5)  # PUB/SUB drops what is sent before the pipe is up

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def until(self, pred, timeout=20):
        """Collects events until pred(events) is true."""
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got.append(self.lines.get(timeout=0.2))
            except queue.Empty:
                pass
            if pred(got):
                return got
        raise AssertionError("timed out after %d events; last: %r" %
                             (len(got), [(e["type"], e["event_id"]) for e in got[-5:]]))

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()


def of(events, pi):
    return [e for e in events if e["event"]["data"]["object"]["id"] == pi]


class OutboxTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        migrate()
        cls.gw = Gateway()

    @classmethod
    def tearDownClass(cls):
        cls.gw.stop()

    def setUp(self):
        self.pd = Paymentd(GATEWAY_URL=self.gw.url, OUTBOX_LEASE_MS=1500, OUTBOX_POLL_MS=200)
        self.addCleanup(self.pd.cleanup)
        self.pd.start()
        _, self.acct_id, key = new_account("outbox")
        self.c = Client(self.pd.port, key)

    def pay(self, pm="pm_card_visa"):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 990, "currency": "usd",
                                                      "payment_method": pm, "confirm": "true"})
        self.assertIn(code, (200, 402))
        return pi["id"] if code == 200 else pi["error"]["payment_intent"]["id"]

    def test_events_in_order_and_redelivered_with_the_same_id(self):
        sub = Subscriber(self.pd)
        self.addCleanup(sub.close)
        pi = self.pay()
        got = of(sub.until(lambda ev: len(of(ev, pi)) >= 2), pi)
        self.assertEqual([e["type"] for e in got], ["payment_intent.created", "payment_intent.succeeded"])
        ids = [r[0] for r in sql("SELECT event_id FROM outbox WHERE aggregate_id = '%s' ORDER BY id" % pi)]
        self.assertEqual([e["event_id"] for e in got], ids)
        self.assertEqual(got[1]["event"]["id"], ids[1])
        wait_for(lambda: sql("SELECT count(*) FROM outbox WHERE aggregate_id = '%s' AND sent_at IS NULL" % pi) == [["0"]],
                 10, what="marked sent")
        metrics = self.pd.metrics()
        published = [l for l in metrics.splitlines() if l.startswith('paymentd_events_published_total{sink="nng"} ')]
        self.assertTrue(published and int(published[0].split()[-1]) >= 2, published)
        self.assertIn("paymentd_events_pending ", metrics)
        self.assertIn("paymentd_events_oldest_pending_age_seconds ", metrics)
        # A dispatcher that died after publishing and before marking: the row is
        # still pending, and it goes out again with the same event id.
        sql("UPDATE outbox SET sent_at = NULL, available_at = now() WHERE event_id = '%s'" % ids[1])
        again = sub.until(lambda ev: any(e["event_id"] == ids[1] for e in ev))
        self.assertEqual([e["event_id"] for e in again if e["event_id"] == ids[1]], [ids[1]])

    def test_nothing_lost_while_the_dispatcher_is_down(self):
        self.pd.ctl("stop", "outbox")
        wait_for(lambda: self.pd.role("outbox", 0)["state"] == "stopped", 10, what="outbox stopped")
        pis = [self.pay() for _ in range(5)] + [self.pay("pm_card_chargeDeclined")]
        pending = int(sql("SELECT count(*) FROM outbox WHERE account_id = %s AND sent_at IS NULL" % self.acct_id)[0][0])
        self.assertEqual(pending, 12)
        sub = Subscriber(self.pd)
        self.addCleanup(sub.close)
        self.pd.ctl("start", "outbox")
        got = sub.until(lambda ev: all(len(of(ev, p)) >= 2 for p in pis))
        for p in pis:
            types = [e["type"] for e in of(got, p)]
            self.assertEqual(types[0], "payment_intent.created")
            self.assertIn(types[1], ("payment_intent.succeeded", "payment_intent.payment_failed"))

    def test_kill_9_of_the_dispatcher_loses_nothing(self):
        sub = Subscriber(self.pd)
        self.addCleanup(sub.close)
        pis = []
        for i in range(10):
            pis.append(self.pay())
            if i == 4:
                os.kill(self.pd.role("outbox", 0)["pid"], signal.SIGKILL)
        got = sub.until(lambda ev: all(len(of(ev, p)) >= 2 for p in pis), timeout=30)
        ids = {r[0] for r in sql("SELECT event_id FROM outbox WHERE aggregate_id IN (%s)" %
                                 ",".join("'%s'" % p for p in pis))}
        self.assertEqual({e["event_id"] for e in got if e["event_id"] in ids}, ids)

    def test_two_dispatchers_share_the_work_in_order(self):
        second_url = "ipc://%s/events-b.ipc" % self.pd.run_dir
        env = dict(self.pd.env, EVENTS_URL=second_url)
        other = subprocess.Popen([os.path.join(BIN, "paymentd"), "--role", "outbox", "--index", "1"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (other.terminate(), other.wait(10)))
        a, b = Subscriber(self.pd), Subscriber(self.pd, url=second_url)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        pis = [self.pay() for _ in range(30)]
        wait_for(lambda: sql("SELECT count(*) FROM outbox WHERE account_id = %s AND sent_at IS NULL" % self.acct_id)
                 == [["0"]], 30, what="every event sent")
        time.sleep(0.5)
        seen = []
        for s in (a, b):
            while not s.lines.empty():
                seen.append(s.lines.get())
        expected = {r[0] for r in sql("SELECT event_id FROM outbox WHERE account_id = %s" % self.acct_id)}
        self.assertEqual({e["event_id"] for e in seen} & expected, expected)
        # Per payment, events were sent in the order they were written.
        bad = sql("SELECT count(*) FROM outbox x JOIN outbox y ON x.aggregate_id = y.aggregate_id"
                  " AND x.id < y.id WHERE x.account_id = %s AND x.sent_at > y.sent_at" % self.acct_id)
        self.assertEqual(bad, [["0"]])

    def test_a_rolled_back_change_publishes_nothing(self):
        sub = Subscriber(self.pd)
        self.addCleanup(sub.close)
        code, pi = self.c.post("/v1/payment_intents", {"amount": 1, "currency": "usd"})
        sql("BEGIN; UPDATE payment_intents SET status = 'canceled' WHERE public_id = '%s';"
            " SELECT outbox_event(account_id, 'payment_intent.canceled', payment_intent_object(p), public_id)"
            " FROM payment_intents p WHERE public_id = '%s'; ROLLBACK;" % (pi["id"], pi["id"]))
        self.assertEqual(sql("SELECT type FROM outbox WHERE aggregate_id = '%s'" % pi["id"]),
                         [["payment_intent.created"]])
        marker = self.pay()
        got = sub.until(lambda ev: len(of(ev, marker)) >= 2)
        self.assertEqual([e["type"] for e in of(got, pi["id"])], ["payment_intent.created"])


if __name__ == "__main__":
    unittest.main()
