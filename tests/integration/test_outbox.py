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

    def __init__(self, pd, url=None, topic="all", args=()):
        env = {k: v for k, v in pd.env.items() if k != "RUN_DIR"}
        if url:
            env["EVENTS_URL"] = url
        self.proc = subprocess.Popen([os.path.join(BIN, "paymentctl"), "--run-dir", pd.run_dir, "subscribe", topic] + list(args),
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

    def test_a_subscriber_that_was_away_gets_what_it_missed(self):
        sub = Subscriber(self.pd)
        first = self.pay()
        seen = sub.until(lambda ev: len(of(ev, first)) >= 2)
        last = seen[-1]["event_id"]
        sub.close()
        missed = [self.pay() for _ in range(3)]
        wait_for(lambda: sql("SELECT count(*) FROM outbox WHERE account_id = %s AND sent_at IS NULL"
                             % self.acct_id) == [["0"]], 20, what="published while it was away")
        back = Subscriber(self.pd, args=["--after", last])
        self.addCleanup(back.close)
        got = back.until(lambda ev: all(len(of(ev, p)) >= 2 for p in missed))
        expected = [r[0] for r in sql("SELECT event_id FROM outbox WHERE aggregate_id IN (%s) ORDER BY id"
                                      % ",".join("'%s'" % p for p in missed))]
        replayed = [e["event_id"] for e in got if e["event_id"] in expected]
        self.assertEqual(replayed[:len(expected)], expected)  # in order, with their own ids

    def test_a_rolled_back_change_publishes_nothing(self):
        sub = Subscriber(self.pd)
        self.addCleanup(sub.close)
        code, pi = self.c.post("/v1/payment_intents", {"amount": 1, "currency": "usd"})
        # The change writes its event (the state machine's trigger), then rolls back.
        sql("BEGIN; UPDATE payment_intents SET status = 'canceled', transition = 'cancel'"
            " WHERE public_id = '%s'; ROLLBACK;" % pi["id"])
        self.assertEqual(sql("SELECT type FROM outbox WHERE aggregate_id = '%s'" % pi["id"]),
                         [["payment_intent.created"]])
        marker = self.pay()
        got = sub.until(lambda ev: len(of(ev, marker)) >= 2)
        self.assertEqual([e["type"] for e in of(got, pi["id"])], ["payment_intent.created"])


if __name__ == "__main__":
    unittest.main()


class OutboxCrashTest(unittest.TestCase):
    """kill -9 of the dispatcher after it published an event and before its
    "mark sent" committed: the event comes again, with the same id."""

    def test_kill_9_between_publish_and_mark(self):
        migrate()
        gw = Gateway()
        self.addCleanup(gw.stop)
        pd = Paymentd(GATEWAY_URL=gw.url, OUTBOX_LEASE_MS=1500, OUTBOX_POLL_MS=200)
        self.addCleanup(pd.cleanup)
        pd.start()
        _, _, key = new_account("crash")
        c = Client(pd.port, key)
        pd.ctl("stop", "outbox")
        wait_for(lambda: pd.role("outbox", 0)["state"] == "stopped", 10, what="outbox stopped")
        code, pi = c.post("/v1/payment_intents", {"amount": 700, "currency": "usd"})
        self.assertEqual(code, 200)
        # A test-only trigger holds the "mark sent" of this payment's event for
        # three seconds, then aborts it: what a dispatcher killed before its
        # commit leaves behind. The test kills the dispatcher inside the hold.
        sql("CREATE OR REPLACE FUNCTION test_hold_mark() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF OLD.sent_at IS NULL AND NEW.sent_at IS NOT NULL AND NEW.aggregate_id = '%s' THEN"
            " PERFORM pg_sleep(3); RAISE EXCEPTION 'mark held and dropped by the test';"
            " END IF; RETURN NEW; END $$;"
            " CREATE TRIGGER test_hold_mark BEFORE UPDATE ON outbox FOR EACH ROW"
            " EXECUTE FUNCTION test_hold_mark();" % pi["id"])
        self.addCleanup(sql, "DROP TRIGGER IF EXISTS test_hold_mark ON outbox; DROP FUNCTION IF EXISTS test_hold_mark()")
        sub = Subscriber(pd)
        self.addCleanup(sub.close)
        pd.ctl("start", "outbox")
        first = sub.until(lambda ev: of(ev, pi["id"]))
        event_id = of(first, pi["id"])[0]["event_id"]
        time.sleep(0.3)  # the mark is now held inside the trigger
        self.assertEqual(sql("SELECT sent_at IS NULL FROM outbox WHERE event_id = '%s'" % event_id), [["t"]])
        os.kill(pd.role("outbox", 0)["pid"], signal.SIGKILL)
        sql("DROP TRIGGER test_hold_mark ON outbox")
        again = sub.until(lambda ev: of(ev, pi["id"]), timeout=30)
        self.assertEqual([e["event_id"] for e in of(again, pi["id"])], [event_id])
        wait_for(lambda: sql("SELECT sent_at IS NOT NULL FROM outbox WHERE event_id = '%s'" % event_id) == [["t"]],
                 20, what="marked sent after the restart")


class DocumentedFormatTest(unittest.TestCase):
    """A subscriber written from README alone decodes every event type."""

    def test_every_event_type(self):
        migrate()
        gw = Gateway()
        self.addCleanup(gw.stop)
        acct, _, key = new_account("format")
        pd = Paymentd(GATEWAY_URL=gw.url, SAGA_ACCOUNT=acct, OUTBOX_POLL_MS=200)
        self.addCleanup(pd.cleanup)
        pd.start()
        wait_for(lambda: "taking InventoryReserved" in pd.logs(), 15, what="intake open")
        c = Client(pd.port, key)
        proc = subprocess.Popen([os.path.join(BIN, "doc_subscriber"), "ipc://%s/events.ipc" % pd.run_dir, "1000"],
                                stdout=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l.strip()) for l in proc.stdout], daemon=True).start()
        time.sleep(0.5)
        pay = lambda **kw: c.post("/v1/payment_intents", dict({"amount": 500, "currency": "usd"}, **kw))
        pay(payment_method="pm_card_visa", confirm="true")                       # created, succeeded
        pay(payment_method="pm_card_chargeDeclined", confirm="true")             # payment_failed
        code, ra = pay(payment_method="pm_card_authenticationRequired", confirm="true")  # requires_action
        c.post("/v1/payment_intents/%s/cancel" % ra["id"])                        # canceled
        pay(payment_method="pm_card_visa", capture_method="manual", confirm="true")  # amount_capturable_updated
        for pm in ("pm_card_visa", "pm_card_chargeDeclined"):                     # PaymentCompleted, PaymentFailed
            r = subprocess.run([os.path.join(BIN, "paymentctl"), "--run-dir", pd.run_dir, "intake"],
                               input=json.dumps({"orderId": "ord_" + pm, "amount": 800, "currency": "usd",
                                                 "paymentMethod": pm, "eventId": "e"}),
                               text=True, capture_output=True,
                               env={k: v for k, v in pd.env.items() if k != "RUN_DIR"})
            self.assertEqual(r.returncode, 0, r.stderr)
        wanted = {"payment_intent.created", "payment_intent.succeeded", "payment_intent.payment_failed",
                  "payment_intent.requires_action", "payment_intent.canceled",
                  "payment_intent.amount_capturable_updated", "PaymentCompleted", "PaymentFailed"}
        seen, deadline = set(), time.monotonic() + 30
        while not wanted <= seen and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            self.assertFalse(line.startswith("BAD"), line)
            seen.add(line.split()[0])
        self.assertLessEqual(wanted, seen)
