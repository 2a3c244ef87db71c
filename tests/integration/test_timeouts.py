"""Every remote call has a timeout, names are resolved at start-up, and the
processing lease covers a job's worst case:

- a Redis that stalls (SIGSTOP: connected, never answers) costs a request at
  most REDIS_TIMEOUT_MS, idempotent POSTs are answered through PostgreSQL,
  and everything recovers after SIGCONT;
- a statement stuck behind a row lock ends at DB_STATEMENT_TIMEOUT_MS with
  503 and Retry-After while the api serves other requests; a database path
  that stalls (so the server's timeout never arrives) ends at the client's
  guard, DB_STATEMENT_TIMEOUT_MS + 2 s;
- PROCESSING_LEASE_MS shorter than a job's worst case stops start-up;
- POSTGRES_HOST / REDIS_HOST given as names are resolved once, and a name
  that does not resolve stops the roles with exit code 2, naming the
  variable.

Redis and the stalled database path are this test's own (a private Redis, a
TCP proxy in front of the test PostgreSQL), so the shared servers are never
stopped."""
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest

from harness import (BIN, SOURCE, Client, Gateway, Paymentd, free_port, migrate, new_account, sql,
                     wait_for)

gateway = None


def setUpModule():
    global gateway
    migrate()
    gateway = Gateway()


def tearDownModule():
    gateway.stop()


def lib(script, timeout=120):
    r = subprocess.run(["bash", "-c", "source %s/scripts/lib.sh; %s" % (SOURCE, script)],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError("%s: %s %s" % (script, r.stdout, r.stderr))


def tmpdir(test, prefix):
    base = os.environ.get("PAYMENTD_TEST_TMP") or tempfile.gettempdir()
    d = tempfile.mkdtemp(prefix=prefix, dir=base)
    os.chmod(d, 0o755)
    test.addCleanup(shutil.rmtree, d, True)
    return d


def timed(fn, *args, **kw):
    t0 = time.monotonic()
    result = fn(*args, **kw)
    return time.monotonic() - t0, result


def create_body(i=0):
    return {"amount": 1000 + i, "currency": "usd"}


class RedisStallTest(unittest.TestCase):
    def test_stalled_redis_costs_at_most_its_timeout(self):
        d = tmpdir(self, "redis-")
        port = free_port()
        lib("redis_start %s %d no" % (d, port))
        with open(os.path.join(d, "redis.pid")) as f:
            pid = int(f.read().strip())
        # SIGCONT first: a stopped Redis would not act on redis_stop's SIGTERM.
        self.addCleanup(lib, "redis_stop %s" % d)
        self.addCleanup(lambda: os.kill(pid, signal.SIGCONT))

        pd = Paymentd(GATEWAY_URL=gateway.url, REDIS_HOST="127.0.0.1", REDIS_PORT=port)
        self.addCleanup(pd.cleanup)
        pd.start()
        wait_for(lambda: pd.json("/readyz")[1]["status"] == "ready", 20, what="ready with redis")
        _, _, key = new_account("redis-stall")
        c = Client(pd.port, key)
        code, first = c.post("/v1/payment_intents", create_body(), idem="stall-before")
        self.assertEqual(code, 200, first)

        os.kill(pid, signal.SIGSTOP)
        # Through a few rounds of drop and reconnect (1 s apart): each POST is
        # answered from PostgreSQL, none waits on Redis for long.
        timings = []
        for i in range(8):
            took, (code, text, headers) = timed(c.call, "POST", "/v1/payment_intents",
                                                create_body(i), idem="stall-%d" % i, timeout=10)
            timings.append(took)
            self.assertEqual(code, 200, text)
            time.sleep(0.3)
        took, (code, text, headers) = timed(c.call, "POST", "/v1/payment_intents", create_body(3),
                                            idem="stall-3", timeout=10)
        timings.append(took)
        self.assertEqual((code, headers.get("Idempotent-Replayed")), (200, "true"), text)
        # The key written before the stall is known to PostgreSQL too.
        took, (code, text, headers) = timed(c.call, "POST", "/v1/payment_intents", create_body(),
                                            idem="stall-before", timeout=10)
        timings.append(took)
        self.assertEqual((code, json.loads(text)["id"]), (200, first["id"]))
        self.assertLess(max(timings), 2.0, timings)
        took, (code, ready) = timed(pd.json, "/readyz")
        self.assertEqual((code, ready["status"]), (200, "degraded"), ready)
        self.assertLess(took, 2.0)
        self.assertIn("did not answer within 250 ms (REDIS_TIMEOUT_MS)", pd.logs())

        os.kill(pid, signal.SIGCONT)
        wait_for(lambda: pd.json("/readyz")[1]["status"] == "ready", 15, what="redis back")
        self.assertIn("redis 127.0.0.1:%d connected" % port, pd.logs())
        code, pi = c.post("/v1/payment_intents", create_body(), idem="stall-after")
        self.assertEqual(code, 200, pi)
        stored = subprocess.run(["redis-cli", "-p", str(port), "--scan"], capture_output=True,
                                text=True, timeout=10).stdout
        self.assertTrue(stored.strip(), "Redis is written to again after SIGCONT")


class RowLock:
    """A psql session holding a row lock on one payment intent until released."""

    def __init__(self, public_id):
        env = dict(os.environ, PGAPPNAME="timeouts-locker")
        self.proc = subprocess.Popen(
            ["psql", "-h", env.get("POSTGRES_HOST", "127.0.0.1"), "-p", env.get("POSTGRES_PORT", "5432"),
             "-U", env.get("POSTGRES_USERNAME", "paymentd"), "-d", env.get("POSTGRES_DATABASE", "paymentd"),
             "-v", "ON_ERROR_STOP=1", "-qAt"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        self.proc.stdin.write("BEGIN;\nSELECT id FROM payment_intents WHERE public_id = '%s' FOR UPDATE;\n"
                              % public_id)
        self.proc.stdin.flush()
        wait_for(lambda: sql("SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                             " 'timeouts-locker' AND state = 'idle in transaction'") == [["1"]],
                 10, what="the row lock held")

    def release(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("COMMIT;\n")
            self.proc.stdin.close()
            self.proc.wait(10)
            self.proc.stderr.close()


class StatementTimeoutTest(unittest.TestCase):
    def test_blocked_update_answers_503_and_others_are_served(self):
        pd = Paymentd(GATEWAY_URL=gateway.url, DB_STATEMENT_TIMEOUT_MS=1500)
        self.addCleanup(pd.cleanup)
        pd.start()
        _, _, key = new_account("row-lock")
        c = Client(pd.port, key)
        code, pi = c.post("/v1/payment_intents", create_body())
        self.assertEqual(code, 200, pi)

        lock = RowLock(pi["id"])
        self.addCleanup(lock.release)
        result = {}

        def update():
            result["took"], result["answer"] = timed(
                c.call, "POST", "/v1/payment_intents/" + pi["id"], {"description": "blocked"}, timeout=20)

        t = threading.Thread(target=update)
        t.start()
        time.sleep(0.3)
        # Meanwhile the api answers other requests at once.
        while t.is_alive():
            took, (code, text, _) = timed(c.call, "GET", "/v1/payment_intents/" + pi["id"])
            self.assertEqual(code, 200, text)
            self.assertLess(took, 1.0)
            took, (code, text, _) = timed(c.call, "POST", "/v1/payment_intents", create_body(1))
            self.assertEqual(code, 200, text)
            self.assertLess(took, 1.0)
            time.sleep(0.2)
        t.join()
        code, text, headers = result["answer"]
        self.assertEqual((code, headers.get("Retry-After")), (503, "1"), text)
        self.assertEqual(json.loads(text)["error"]["code"], "database_unavailable")
        self.assertGreaterEqual(result["took"], 1.3)  # it did wait for the lock
        self.assertLess(result["took"], 1.5 + 1.5)
        self.assertIn("statement timeout", pd.logs())  # the server's, not the guard's

        lock.release()
        code, after = c.post("/v1/payment_intents/" + pi["id"], {"description": "after"})
        self.assertEqual((code, after.get("description")), (200, "after"), after)


class FreezableProxy:
    """A TCP proxy to the test PostgreSQL that can stop forwarding: the
    connections stay open and nothing arrives, as with a stalled server or
    network, so PostgreSQL's own statement_timeout never reaches the client."""

    def __init__(self, target_port):
        self.target = target_port
        self.frozen = threading.Event()
        self.done = threading.Event()
        self.socks = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.done.is_set():
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                continue
            self.socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a, b):
        try:
            while not self.done.is_set():
                if self.frozen.is_set():
                    time.sleep(0.05)
                    continue
                ready, _, _ = select.select([a, b], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def close(self):
        self.done.set()
        self.listener.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


class StalledDatabaseTest(unittest.TestCase):
    def test_client_guard_fails_a_query_the_server_never_answers(self):
        proxy = FreezableProxy(int(os.environ.get("POSTGRES_PORT", "5432")))
        self.addCleanup(proxy.close)
        pd = Paymentd(GATEWAY_URL=gateway.url, POSTGRES_PORT=proxy.port, DB_STATEMENT_TIMEOUT_MS=1000,
                      API_PROCESSES=1)
        self.addCleanup(pd.cleanup)
        pd.start()
        _, _, key = new_account("stalled-db")
        c = Client(pd.port, key)
        code, pi = c.post("/v1/payment_intents", create_body())
        self.assertEqual(code, 200, pi)

        proxy.frozen.set()
        took, (code, text, headers) = timed(c.call, "GET", "/v1/payment_intents/" + pi["id"], timeout=20)
        self.assertEqual((code, headers.get("Retry-After")), (503, "1"), text)
        # DB_STATEMENT_TIMEOUT_MS + 2 s, not the TCP timeout.
        self.assertGreaterEqual(took, 2.5)
        self.assertLess(took, 5.0)
        self.assertIn("no result within 3000 ms (DB_STATEMENT_TIMEOUT_MS + 2 s)", pd.logs())
        self.assertEqual(pd.http("/healthz")[0], 200)

        proxy.frozen.clear()
        wait_for(lambda: c.get("/v1/payment_intents/" + pi["id"])[0] == 200, 20, interval=0.3,
                 what="queries answered again")


class LeaseTest(unittest.TestCase):
    def test_lease_shorter_than_a_job_stops_start_up(self):
        pd = Paymentd(GATEWAY_URL=gateway.url, PROCESSING_LEASE_MS=1000, GATEWAY_TIMEOUT_MS=500,
                      GATEWAY_MAX_ATTEMPTS=2, GATEWAY_RETRY_CAP_MS=200, DB_STATEMENT_TIMEOUT_MS=1000)
        self.addCleanup(pd.cleanup)
        r = subprocess.run([os.path.join(BIN, "paymentd")], env=pd.env, capture_output=True, text=True,
                           timeout=20)
        self.assertEqual(r.returncode, 2, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, r.stderr)
        entry = json.loads(lines[0])
        self.assertEqual(entry["level"], "fatal")
        # 2 x 500 + 1 x 200 + 2 x 1000
        for needle in ("PROCESSING_LEASE_MS", "3200 ms", "GATEWAY_MAX_ATTEMPTS 2", "GATEWAY_TIMEOUT_MS 500",
                       "GATEWAY_RETRY_CAP_MS 200", "DB_STATEMENT_TIMEOUT_MS 1000"):
            self.assertIn(needle, entry["msg"])

        # Long enough (or unset): it starts.
        r = subprocess.run([os.path.join(BIN, "paymentd"), "--check"],
                           env=dict(pd.env, PROCESSING_LEASE_MS="3200"), capture_output=True, text=True,
                           timeout=20)
        self.assertEqual(r.returncode, 0, r.stderr)


class NamesTest(unittest.TestCase):
    def test_host_names_are_resolved_at_start_up(self):
        pd = Paymentd(GATEWAY_URL=gateway.url, POSTGRES_HOST="localhost", REDIS_HOST="localhost")
        self.addCleanup(pd.cleanup)
        pd.start()
        wait_for(lambda: pd.json("/readyz")[1]["status"] == "ready", 20, what="ready by names")
        _, _, key = new_account("names")
        code, pi = Client(pd.port, key).post("/v1/payment_intents", create_body(), idem="by-name")
        self.assertEqual(code, 200, pi)

    def assert_roles_refused(self, variable, roles):
        pd = Paymentd(GATEWAY_URL=gateway.url, **{variable: "no-such-host.invalid"})
        self.addCleanup(pd.cleanup)
        pd.start(wait=False)

        def refused():
            rows = [r for r in pd.status() if r["role"] in roles]
            return rows and all(r["state"] == "failed" for r in rows)
        wait_for(refused, 30, what="%s roles failed" % ",".join(roles))
        logs = [json.loads(line) for line in pd.logs().splitlines() if line.startswith("{")]
        fatal = [e for e in logs if e["level"] == "fatal"]
        self.assertTrue(fatal, pd.logs(4000))
        for e in fatal:
            self.assertIn("%s no-such-host.invalid cannot be resolved" % variable, e["msg"])
        self.assertIn("exited with code 2", pd.logs())
        # Not respawned: each refused role started once.
        self.assertTrue(all(r["restarts"] == 0 for r in pd.status() if r["role"] in roles), pd.status())

    def test_unresolvable_redis_host_stops_the_api(self):
        self.assert_roles_refused("REDIS_HOST", ("api",))

    def test_unresolvable_postgres_host_stops_its_users(self):
        self.assert_roles_refused("POSTGRES_HOST", ("api", "worker", "outbox"))


if __name__ == "__main__":
    unittest.main()
