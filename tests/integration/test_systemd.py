"""The systemd unit passes `systemd-analyze verify`, and the example
environment file is accepted by paymentd's own configuration parser."""
import os
import shutil
import subprocess
import tempfile
import unittest

from harness import BIN, SOURCE


class SystemdTest(unittest.TestCase):
    def test_unit_verifies(self):
        analyze = shutil.which("systemd-analyze")
        if not analyze:
            self.skipTest("systemd-analyze is not installed")
        unit = os.path.join(SOURCE, "systemd", "paymentd.service")
        with tempfile.TemporaryDirectory() as d:
            # verify resolves ExecStart: point it at the built binary.
            text = open(unit).read().replace("/usr/local/bin/paymentd", os.path.join(BIN, "paymentd"))
            path = os.path.join(d, "paymentd.service")
            with open(path, "w") as f:
                f.write(text)
            r = subprocess.run([analyze, "verify", path], capture_output=True, text=True, timeout=60)
        # Warnings about the host (no running systemd, missing users) are not the unit's errors.
        problems = [l for l in (r.stdout + r.stderr).splitlines()
                    if "paymentd.service" in l and "Failed to" not in l and "not running" not in l]
        self.assertEqual(problems, [], r.stdout + r.stderr)

    def test_example_environment_is_valid(self):
        example = os.path.join(SOURCE, "systemd", "paymentd.env.example")
        env = dict(os.environ)
        env["PORT"] = "abc"  # the file wins over the environment
        r = subprocess.run([os.path.join(BIN, "paymentd"), "--check", "--config", example],
                           capture_output=True, text=True, env=env, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("configuration ok", r.stdout)
        with tempfile.NamedTemporaryFile("w", suffix=".env") as bad:
            bad.write(open(example).read() + "\nSHUTDOWN_TIMEOUT=forever\n")
            bad.flush()
            r = subprocess.run([os.path.join(BIN, "paymentd"), "--check", "--config", bad.name],
                               capture_output=True, text=True, env=env, timeout=30)
        self.assertEqual(r.returncode, 2)
        self.assertIn("SHUTDOWN_TIMEOUT", r.stderr)


if __name__ == "__main__":
    unittest.main()


class NotifyTest(unittest.TestCase):
    """The supervisor's messages to systemd, read from a NOTIFY_SOCKET of our own."""

    def test_ready_watchdog_status_stopping(self):
        import signal
        import socket
        import time

        from harness import Paymentd, wait_for

        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(0.2)
        self.addCleanup(sock.close)
        pd = Paymentd(NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
        self.addCleanup(pd.cleanup)
        pd.start()
        messages = []

        def drain():
            while True:
                try:
                    messages.append(sock.recv(4096).decode())
                except socket.timeout:
                    return

        wait_for(lambda: drain() or any("READY=1" in m for m in messages), 10, what="READY=1")
        time.sleep(1.5)
        drain()
        self.assertTrue(any(m.startswith("STATUS=api 2/2, worker 2/2, outbox 1/1, exporter 1/1 running")
                            for m in messages), messages)
        self.assertGreaterEqual(sum("WATCHDOG=1" in m for m in messages), 2, messages)
        # READY=1 comes once, and only after every role was up.
        self.assertEqual(sum("READY=1" in m for m in messages), 1)
        pd.proc.send_signal(signal.SIGTERM)
        self.assertEqual(pd.proc.wait(30), 0)
        drain()
        self.assertTrue(any("STOPPING=1" in m for m in messages), messages)
