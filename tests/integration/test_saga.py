"""The order saga over NNG: InventoryReserved in, PaymentCompleted or
PaymentFailed out through the outbox. Every message is answered (REQ/REP),
and only once its payment row is committed: ok with the payment's id, ok and
duplicate for an order that already has its payment (one payment, one charge
however often it is sent), an error with the field and retry false for a
malformed message, retry true while the database is unavailable."""
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
import unittest

from harness import (BIN, SOURCE, Gateway, Paymentd, free_port, migrate, new_account, sql,
                     wait_for)
from test_outbox import Subscriber

CARD = "4242 4242 4242 4242"


def intake(pd, message=None, raw=None, timeout=30):
    """paymentctl intake: (exit code, the answer as a dict or None)."""
    args = [os.path.join(BIN, "paymentctl"), "--run-dir", pd.run_dir, "intake"]
    if raw is not None:
        args.append("--raw")
    env = {k: v for k, v in pd.env.items() if k != "RUN_DIR"}
    r = subprocess.run(args, input=raw if raw is not None else json.dumps(message).encode(),
                       capture_output=True, env=env, timeout=timeout)
    lines = r.stdout.decode().splitlines()
    return r.returncode, json.loads(lines[0]) if lines else r.stderr.decode()


def order(pm="pm_card_visa", amount=2599):
    return {"orderId": "ord_" + uuid.uuid4().hex[:12], "amount": amount, "currency": "usd",
            "customerId": "cus_saga", "paymentMethod": pm, "eventId": "evt_inv_" + uuid.uuid4().hex[:8]}


def pack(v):
    """Just enough msgpack for hand-made envelopes (str, int, bool, map)."""
    if isinstance(v, bool):
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        return b"\xd3" + struct.pack(">q", v)
    if isinstance(v, str):
        b = v.encode()
        return (bytes([0xa0 | len(b)]) if len(b) < 32 else b"\xd9" + bytes([len(b)])) + b
    if isinstance(v, dict):
        return b"\xde" + struct.pack(">H", len(v)) + b"".join(pack(k) + pack(x) for k, x in v.items())
    raise TypeError(v)


def envelope(type_, body, v=1):
    return pack({"v": v, "type": type_, "id": "msg_test", "request_id": "req_test",
                 "sent_at_ms": int(time.time() * 1000), "deadline_ms": 0, "body": body})


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

    def send(self, message=None, raw=None, code=0):
        rc, answer = intake(self.pd, message, raw)
        self.assertEqual(rc, code, answer)
        return answer

    def refused(self, answer, field):
        self.assertIs(answer["ok"], False, answer)
        self.assertIs(answer["retry"], False, answer)
        self.assertTrue(answer["error"], answer)
        self.assertEqual(answer.get("field"), field, answer)

    def payment_of(self, o):
        return sql("SELECT public_id FROM payment_intents WHERE account_id = %s AND order_id = '%s'"
                   % (self.acct_id, o["orderId"]))

    def test_the_answer_names_the_stored_payment(self):
        o = order()
        answer = self.send(o)
        self.assertEqual(set(answer), {"ok", "paymentId", "duplicate"})
        self.assertIs(answer["ok"], True)
        self.assertIs(answer["duplicate"], False)
        # Stored before the answer left: no waiting here.
        self.assertEqual(self.payment_of(o), [[answer["paymentId"]]])

    def test_completed_and_failed(self):
        sub = Subscriber(self.pd)
        self.addCleanup(sub.close)
        ok, bad = order(), order(pm="pm_card_chargeDeclined", amount=1200)
        ok_id = self.send(ok)["paymentId"]
        bad_id = self.send(bad)["paymentId"]
        mine = lambda ev, o: [e for e in ev if e["type"] in ("PaymentCompleted", "PaymentFailed")
                              and e["event"]["orderId"] == o["orderId"]]
        got = sub.until(lambda ev: mine(ev, ok) and mine(ev, bad))
        done, failed = mine(got, ok)[0], mine(got, bad)[0]
        self.assertEqual(done["type"], "PaymentCompleted")
        body = done["event"]
        self.assertEqual(set(body), {"orderId", "paymentId", "transactionId", "amount", "currency", "timestamp"})
        self.assertEqual((body["amount"], body["currency"]), (2599, "usd"))
        self.assertEqual(body["paymentId"], ok_id)
        self.assertTrue(body["transactionId"].startswith("txn_"))
        self.assertEqual(sql("SELECT status, order_id FROM payment_intents WHERE public_id = '%s'" % ok_id),
                         [["succeeded", ok["orderId"]]])
        self.assertEqual(failed["type"], "PaymentFailed")
        self.assertEqual(failed["event"]["paymentId"], bad_id)
        self.assertEqual(set(failed["event"]), {"orderId", "paymentId", "reason", "timestamp"})
        self.assertIn("declined", failed["event"]["reason"])
        # The saga's messages follow the payment's own events.
        types = [e["type"] for e in got if e["event"].get("paymentId") == ok_id
                 or e["event"].get("data", {}).get("object", {}).get("id") == ok_id]
        self.assertEqual(types, ["payment_intent.created", "payment_intent.succeeded", "PaymentCompleted"])

    def test_same_order_again_is_a_duplicate_one_payment_one_charge(self):
        sub = Subscriber(self.pd)
        self.addCleanup(sub.close)
        o = order()
        first = self.send(o)
        self.assertEqual((first["ok"], first["duplicate"]), (True, False))
        for _ in range(3):
            again = self.send(o)
            self.assertEqual(again, {"ok": True, "paymentId": first["paymentId"], "duplicate": True})
        sub.until(lambda ev: any(e["type"] == "PaymentCompleted" and e["event"]["orderId"] == o["orderId"] for e in ev))
        # After the outcome too, and with another eventId (a second publisher).
        again = self.send(dict(o, eventId="evt_inv_other"))
        self.assertEqual(again, {"ok": True, "paymentId": first["paymentId"], "duplicate": True})
        self.assertEqual(self.payment_of(o), [[first["paymentId"]]])
        charges = [c for c in self.gw.ledger()["data"]
                   if (c.get("idempotency_key") or "").startswith(first["paymentId"])]
        self.assertEqual(len(charges), 1)
        self.assertEqual(sql("SELECT count(*) FROM outbox WHERE type = 'PaymentCompleted' AND aggregate_id = '%s'"
                             % first["paymentId"]), [["1"]])

    def test_malformed_messages_are_refused_for_good(self):
        before = self.rejected()
        self.refused(self.send(raw=b"\xc1\xff\x00garbage", code=1), None)
        self.refused(self.send(raw=b"", code=1), None)
        self.refused(self.send(raw=envelope("ping", {}), code=1), "type")
        self.refused(self.send(raw=envelope("InventoryReserved", {}, v=2), code=1), "v")
        m = order()
        del m["amount"]
        self.refused(self.send(m, code=1), "amount")
        for field, value in (("amount", -5), ("amount", "12"), ("currency", "xyz"),
                             ("paymentMethod", "pm card"), ("eventId", "")):
            self.refused(self.send(dict(order(), **{field: value}), code=1), field)
        # A card number in any string, known field or not, is refused and never stored or logged.
        for field in ("customerId", "orderId", "note"):
            m = dict(order(), **{field: "x " + CARD})
            self.refused(self.send(m, code=1), field)
        self.refused(self.send(dict(order(), orderId="ord_4242424242424242"), code=1), "orderId")
        self.assertEqual(sql("SELECT count(*) FROM payment_intents WHERE order_id LIKE '%%4242%%'"
                             " OR customer LIKE '%%4242%%'"), [["0"]])
        wait_for(lambda: self.rejected() >= before + 14, 10, what="fourteen rejections counted")
        self.assertNotIn(CARD, self.pd.logs())
        self.assertIn("refused an intake message", self.pd.logs())
        self.assertEqual(self.pd.http("/healthz")[0], 200)
        self.assertEqual(self.pd.role("api", 0)["restarts"], 0)
        # And a good one still goes through.
        self.assertIs(self.send(order())["ok"], True)

    def test_the_answer_waits_until_the_row_is_committed(self):
        """A table lock holds the INSERT: no answer until it commits."""
        env = dict(os.environ)
        lock = subprocess.Popen(["psql", "-h", env.get("POSTGRES_HOST", "127.0.0.1"),
                                 "-p", env.get("POSTGRES_PORT", "5432"), "-U", env.get("POSTGRES_USERNAME", "paymentd"),
                                 "-d", env.get("POSTGRES_DATABASE", "paymentd"), "-qX", "-v", "ON_ERROR_STOP=1"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: lock.poll() is None and lock.kill())
        lock.stdin.write(b"BEGIN;\nLOCK TABLE payment_intents IN ACCESS EXCLUSIVE MODE;\n")
        lock.stdin.flush()
        wait_for(lambda: sql("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                             " WHERE c.relname = 'payment_intents' AND l.mode = 'AccessExclusiveLock'"
                             " AND l.granted") == [["1"]], 10, what="the table lock")
        o = order()
        env = {k: v for k, v in self.pd.env.items() if k != "RUN_DIR"}
        ctl = subprocess.Popen([os.path.join(BIN, "paymentctl"), "--run-dir", self.pd.run_dir, "intake"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.addCleanup(lambda: ctl.poll() is None and ctl.kill())
        ctl.stdin.write(json.dumps(o).encode())
        ctl.stdin.close()
        time.sleep(2)
        self.assertIsNone(ctl.poll(), "answered while the INSERT could not commit")
        lock.stdin.write(b"COMMIT;\n")
        lock.stdin.close()
        lock.wait(10)
        ctl.wait(15)
        out, err = ctl.stdout.read(), ctl.stderr.read()
        ctl.stdout.close()
        ctl.stderr.close()
        self.assertEqual(ctl.returncode, 0, err)
        answer = json.loads(out)
        self.assertEqual((answer["ok"], answer["duplicate"]), (True, False))
        self.assertEqual(self.payment_of(o), [[answer["paymentId"]]])

    def test_no_answer_exits_2(self):
        run_dir = tempfile.mkdtemp(dir=self.pd.dir)
        r = subprocess.run([os.path.join(BIN, "paymentctl"), "--run-dir", run_dir, "intake"],
                           input=json.dumps(order()).encode(), capture_output=True, timeout=30,
                           env={k: v for k, v in self.pd.env.items() if k != "RUN_DIR"})
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertEqual(r.stdout, b"")
        self.assertIn(b"no answer", r.stderr)

    def rejected(self):
        for line in self.pd.metrics().splitlines():
            if line.startswith("paymentd_saga_messages_rejected_total "):
                return int(line.split()[1])
        return 0


def lib(script):
    subprocess.run(["bash", "-c", "source %s/scripts/lib.sh && %s" % (SOURCE, script)],
                   check=True, capture_output=True, timeout=120)


class SagaOutageTest(unittest.TestCase):
    """A private PostgreSQL, stopped while api/0 runs: the publisher is told
    to send again, and once the database is back a re-send stores one payment."""

    def setUp(self):
        base = os.environ.get("PAYMENTD_TEST_TMP") or tempfile.gettempdir()
        self.dir = tempfile.mkdtemp(prefix="saga-pg-", dir=base)
        os.chmod(self.dir, 0o755)
        self.pg_data, self.pg_port = os.path.join(self.dir, "pg"), free_port()
        try:
            lib("pg_start %s %d && pg_ensure_db %d" % (self.pg_data, self.pg_port, self.pg_port))
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            shutil.rmtree(self.dir, True)
            self.skipTest("no private PostgreSQL: %s" % getattr(e, "stderr", e))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.addCleanup(lib, "pg_stop %s immediate" % self.pg_data)
        self.env = dict(os.environ, POSTGRES_PORT=str(self.pg_port))
        self.ctl("migrate")
        acct = self.ctl("create-account", "saga-outage")
        self.gw = Gateway()
        self.addCleanup(self.gw.stop)
        self.pd = Paymentd(GATEWAY_URL=self.gw.url, SAGA_ACCOUNT=acct, POSTGRES_PORT=self.pg_port,
                           OUTBOX_POLL_MS=200)
        self.addCleanup(self.pd.cleanup)
        self.pd.start()
        wait_for(lambda: "taking InventoryReserved" in self.pd.logs(), 15, what="intake open")

    def ctl(self, *args):
        r = subprocess.run([os.path.join(BIN, "paymentctl")] + list(args), env=self.env,
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.strip()

    def psql(self, query):
        r = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "paymentd", "-d", "paymentd",
                            "-qAtX", "-c", query], capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.split()

    def test_database_down_answers_retry_and_a_resend_later_pays_once(self):
        self.assertIs(intake(self.pd, order())[1]["ok"], True)
        lib("pg_stop %s fast" % self.pg_data)
        o = order()
        rc, answer = intake(self.pd, o)
        self.assertEqual(rc, 1, answer)
        self.assertEqual((answer["ok"], answer["retry"]), (False, True), answer)
        self.assertNotIn("field", answer)
        lib("pg_start %s %d" % (self.pg_data, self.pg_port))
        # The publisher sends again while told to; api/0 reconnects by itself.
        deadline = time.monotonic() + 20
        while True:
            rc, answer = intake(self.pd, o)
            if rc == 0 or time.monotonic() > deadline:
                break
            self.assertEqual((rc, answer["retry"]), (1, True), answer)
            time.sleep(0.5)
        self.assertEqual(rc, 0, answer)
        self.assertEqual((answer["ok"], answer["duplicate"]), (True, False))
        self.assertEqual(self.psql("SELECT public_id FROM payment_intents WHERE order_id = '%s'" % o["orderId"]),
                         [answer["paymentId"]])
        wait_for(lambda: self.psql("SELECT status FROM payment_intents WHERE public_id = '%s'"
                                   % answer["paymentId"]) == ["succeeded"], 20, what="the payment succeeded")
        charges = [c for c in self.gw.ledger()["data"]
                   if (c.get("idempotency_key") or "").startswith(answer["paymentId"])]
        self.assertEqual(len(charges), 1)
        self.assertEqual(self.pd.role("api", 0)["restarts"], 0)


if __name__ == "__main__":
    unittest.main()
