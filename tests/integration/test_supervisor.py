"""The supervisor with its real roles, PostgreSQL and Redis: start-up, crashes,
hangs, failure limits, signals, control commands and readiness."""
import os
import signal
import socket
import subprocess
import threading
import time
import unittest

from harness import BIN, Paymentd, free_port, pid_alive, wait_for


class SupervisorTest(unittest.TestCase):
    def make(self, **kw):
        pd = Paymentd(**kw)
        self.addCleanup(pd.cleanup)
        return pd

    def test_all_roles_come_up_and_answer(self):
        pd = self.make().start()
        rows = pd.status()
        roles = sorted((r["role"], r["index"]) for r in rows)
        self.assertEqual(roles, [("api", 0), ("api", 1), ("exporter", 0), ("outbox", 0),
                                 ("worker", 0), ("worker", 1)])
        for r in rows:
            self.assertEqual(r["state"], "running")
            self.assertEqual(r["restarts"], 0)
            self.assertTrue(pid_alive(r["pid"]))
        code, body = pd.json("/healthz")
        self.assertEqual((code, body["status"]), (200, "ok"))
        code, body = wait_for(lambda: (lambda c: c if c[0] == 200 else None)(pd.json("/readyz")),
                              15, what="/readyz 200")
        self.assertEqual(body["checks"], {"postgres": "ok", "redis": "ok", "workers": "ok",
                                          "gateways": {"sim": "closed"}})
        self.assertEqual(body["status"], "ready")
        self.assertIn("pong from worker/1", pd.ctl("ping", "worker/1").stdout)
        self.assertIn("pong from outbox/0", pd.ctl("ping", "outbox/0").stdout)
        metrics = pd.metrics()
        for line in ['paymentd_role_up{role="api",index="0"} 1',
                     'paymentd_role_up{role="worker",index="1"} 1',
                     'paymentd_role_restarts_total{role="worker"} 0',
                     '# TYPE paymentd_http_request_duration_seconds histogram',
                     'paymentd_http_request_duration_seconds_count{route="/healthz"} 1']:
            self.assertIn(line, metrics)
        self.assertRegex(metrics, r'paymentd_build_info\{version="[^"]+",commit="[^"]+"\} 1')
        self.assertRegex(metrics, r'paymentd_http_request_duration_seconds_bucket\{route="/healthz",le="\+Inf"\} 1\n')
        # An unknown path answers in Stripe's error shape.
        code, body = pd.json("/nope")
        self.assertEqual(code, 404)
        self.assertEqual(body["error"]["type"], "invalid_request_error")

    def test_kill_9_worker_comes_back_and_healthz_never_fails(self):
        pd = self.make().start()
        old = pd.role("worker", 0)
        failures, done = [], 0
        stop = threading.Event()

        def hammer():
            nonlocal done
            while not stop.is_set():
                try:
                    code, _ = pd.http("/healthz", timeout=5)
                    if code != 200:
                        failures.append(code)
                except Exception as e:  # noqa: BLE001 - any failure counts
                    failures.append(repr(e))
                done += 1

        t = threading.Thread(target=hammer)
        t.start()
        try:
            time.sleep(0.3)
            os.kill(old["pid"], signal.SIGKILL)
            t0 = time.monotonic()
            new = wait_for(lambda: (lambda r: r if r["state"] == "running" and r["pid"] != old["pid"] else None)(
                pd.role("worker", 0)), 3.0, interval=0.05, what="worker/0 back")
            elapsed = time.monotonic() - t0
            time.sleep(0.3)
        finally:
            stop.set()
            t.join()
        self.assertLess(elapsed, 3.0)
        self.assertEqual(new["restarts"], 1)
        self.assertEqual(new["last_exit"], "signal 9")
        self.assertEqual(failures, [])
        self.assertGreater(done, 20)
        self.assertIn('paymentd_role_restarts_total{role="worker"} 1', pd.metrics())

    def test_crash_loop_is_marked_failed_and_others_stay_up(self):
        # The exporter cannot bind a port that is taken: it exits on every start.
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        self.addCleanup(blocker.close)
        pd = self.make(RESTART_INTENSITY=2, RESTART_PERIOD=60)
        pd.env["METRICS_PORT"] = str(blocker.getsockname()[1])
        pd.start(wait=False)
        wait_for(lambda: pd.role("exporter", 0)["state"] == "failed", 20, what="exporter failed")
        exporter = pd.role("exporter", 0)
        self.assertEqual(exporter["restarts"], 2)
        self.assertEqual(exporter["pid"], 0)
        time.sleep(1.5)
        self.assertEqual(pd.role("exporter", 0)["state"], "failed")  # left down
        for r in pd.status():
            if r["role"] != "exporter":
                self.assertEqual(r["state"], "running", r)
        self.assertEqual(pd.http("/healthz")[0], 200)
        self.assertIn("marked failed", pd.logs())
        # The operator can bring it back once the cause is gone.
        blocker.close()
        pd.ctl("start", "exporter")
        wait_for(lambda: pd.role("exporter", 0)["state"] == "running", 10, what="exporter running")

    def test_hung_role_is_killed_and_replaced(self):
        pd = self.make(ROLE_HANG_TIMEOUT=2).start()
        old = pd.role("worker", 1)
        os.kill(old["pid"], signal.SIGSTOP)
        new = wait_for(lambda: (lambda r: r if r["state"] == "running" and r["pid"] != old["pid"] else None)(
            pd.role("worker", 1)), 15, what="worker/1 replaced")
        self.assertEqual(new["restarts"], 1)
        self.assertEqual(new["last_exit"], "signal 9")
        self.assertFalse(pid_alive(old["pid"]))
        self.assertIn("sent no heartbeat", pd.logs())

    def test_sigterm_exits_0_and_leaves_no_child(self):
        pd = self.make().start()
        pids = pd.child_pids()
        self.assertEqual(len(pids), 6)
        pd.proc.send_signal(signal.SIGTERM)
        self.assertEqual(pd.proc.wait(30), 0)
        for pid in pids:
            self.assertFalse(pid_alive(pid), "child %d survived" % pid)
        self.assertFalse(os.path.exists("/dev/shm/paymentd." + pd.instance))

    def test_sigterm_finishes_requests_in_flight(self):
        pd = self.make(READY_CHECK_TIMEOUT_MS=2500).start()
        pd.ctl("stop", "worker")
        wait_for(lambda: all(r["state"] == "stopped" for r in pd.status() if r["role"] == "worker"),
                 10, what="workers stopped")
        result = {}

        def slow():
            # /readyz waits for a worker that will not answer: a slow request.
            result["resp"] = pd.json("/readyz", timeout=15)

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.5)
        pd.proc.send_signal(signal.SIGTERM)
        t.join(20)
        self.assertEqual(pd.proc.wait(30), 0)
        code, body = result["resp"]
        self.assertEqual(code, 503)
        self.assertEqual(body["checks"]["workers"], "no worker answered")
        with self.assertRaises(OSError):
            pd.http("/healthz", timeout=2)

    def test_kill_9_supervisor_leaves_no_orphans(self):
        pd = self.make().start()
        pids = pd.child_pids()
        pd.proc.send_signal(signal.SIGKILL)
        pd.proc.wait(10)
        wait_for(lambda: not any(pid_alive(p) for p in pids), 3.0, interval=0.05,
                 what="children gone after the supervisor died")

    def test_control_commands(self):
        pd = self.make(READY_CHECK_TIMEOUT_MS=500).start()
        wait_for(lambda: pd.json("/readyz")[0] == 200, 15, what="ready")
        # stop: the role stays down and readiness says what is missing.
        out = pd.ctl("stop", "worker").stdout
        self.assertIn("stopping worker (2 processes)", out)
        wait_for(lambda: all(r["state"] == "stopped" for r in pd.status() if r["role"] == "worker"),
                 10, what="workers stopped")
        code, body = pd.json("/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(body["status"], "unavailable")
        self.assertNotEqual(body["checks"]["workers"], "ok")
        self.assertEqual(body["checks"]["postgres"], "ok")
        # start
        pd.ctl("start", "worker")
        wait_for(lambda: all(r["state"] == "running" for r in pd.status()), 10, what="workers running")
        wait_for(lambda: pd.json("/readyz")[0] == 200, 10, what="ready again")
        # restart one process: a new pid, counted as a restart, the other untouched.
        api0, api1 = pd.role("api", 0), pd.role("api", 1)
        pd.ctl("restart", "api/0")
        wait_for(lambda: (lambda r: r["state"] == "running" and r["pid"] != api0["pid"])(pd.role("api", 0)),
                 15, what="api/0 restarted")
        self.assertEqual(pd.role("api", 0)["restarts"], 1)
        self.assertEqual(pd.role("api", 1)["pid"], api1["pid"])
        # bad targets and commands are refused with a message, the supervisor keeps going.
        r = pd.ctl("restart", "gateway", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no role matches", r.stdout)
        r = pd.ctl("stop", "worker/9", check=False)
        self.assertEqual(r.returncode, 1)
        r = pd.ctl("frobnicate", check=False)
        self.assertEqual(r.returncode, 2)
        # drain: api processes stop and stay stopped; the rest keep running.
        self.assertIn("draining", pd.ctl("drain").stdout)
        wait_for(lambda: all(r["state"] == "stopped" for r in pd.status() if r["role"] == "api"),
                 15, what="api drained")
        time.sleep(1.2)
        for r in pd.status():
            self.assertEqual(r["state"], "stopped" if r["role"] == "api" else "running", r)
        with self.assertRaises(OSError):
            pd.http("/healthz", timeout=2)
        pd.ctl("start", "api")
        wait_for(lambda: pd.http("/healthz")[0] == 200, 10, interval=0.2, what="api back")

    def test_readyz_names_the_missing_dependency(self):
        dead = free_port()
        pd = self.make(REDIS_PORT=dead, READY_CHECK_TIMEOUT_MS=500).start()
        # Once the api has reached its workers and database, only Redis is missing.
        code, body = wait_for(lambda: (lambda c: c if c[1]["checks"]["workers"] == "ok" and
                                       c[1]["checks"]["postgres"] == "ok" else None)(pd.json("/readyz")),
                              15, what="workers and postgres ok")
        # Without Redis, idempotency runs on PostgreSQL alone: degraded, still serving.
        self.assertEqual((code, body["status"]), (200, "degraded"))
        self.assertNotEqual(body["checks"]["redis"], "ok")
        self.assertEqual(body["checks"]["gateways"], {"sim": "closed"})
        self.assertEqual(pd.http("/healthz")[0], 200)
        pd.cleanup()

        pd = self.make(POSTGRES_PORT=dead, READY_CHECK_TIMEOUT_MS=500).start()
        t0 = time.monotonic()
        code, body = pd.json("/readyz")
        self.assertLess(time.monotonic() - t0, 5)  # a dead database answers fast, never hangs
        self.assertEqual(code, 503)
        self.assertNotEqual(body["checks"]["postgres"], "ok")
        code, body = wait_for(lambda: (lambda c: c if c[1]["checks"]["redis"] == "ok" else None)(pd.json("/readyz")),
                              15, what="redis ok")
        self.assertNotEqual(body["checks"]["postgres"], "ok")

    def test_role_runs_alone(self):
        pd = self.make()
        os.makedirs(pd.run_dir)
        proc = subprocess.Popen([os.path.join(BIN, "paymentd"), "--role", "worker", "--index", "0"],
                                env=pd.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: pd.ctl("ping", "worker/0", check=False).returncode == 0, 10,
                     what="worker alone answers a ping")
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(10), 0)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()
            subprocess.run(["rm", "-f", "/dev/shm/paymentd." + pd.instance])


if __name__ == "__main__":
    unittest.main()
