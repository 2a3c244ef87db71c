"""Configuration at start-up and on SIGHUP, against the real binary."""
import json
import os
import signal
import subprocess
import time
import unittest

from harness import BIN, Paymentd, wait_for


class ConfigTest(unittest.TestCase):
    def make(self, **kw):
        pd = Paymentd(**kw)
        self.addCleanup(pd.cleanup)
        return pd

    def run_bad(self, pd, argv=()):
        r = subprocess.run([os.path.join(BIN, "paymentd")] + list(argv), env=pd.env,
                           capture_output=True, text=True, timeout=20)
        return r

    def test_bad_value_exits_2_naming_the_variable(self):
        pd = self.make(PORT="abc")
        r = self.run_bad(pd)
        self.assertEqual(r.returncode, 2)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, r.stderr)
        entry = json.loads(lines[0])
        self.assertEqual(entry["level"], "fatal")
        self.assertIn("PORT", entry["msg"])
        for key in ("time", "role", "index", "pid"):
            self.assertIn(key, entry)

    def test_unknown_key_in_file_exits_2(self):
        pd = self.make()
        path = os.path.join(pd.dir, "bad.env")
        with open(path, "w") as f:
            f.write("PORT=%d\nWROKERS=3\n" % pd.port)
        r = self.run_bad(pd, ["--config", path])
        self.assertEqual(r.returncode, 2)
        self.assertIn("WROKERS", r.stderr)

    def test_secret_is_never_logged(self):
        pd = self.make(JWT_SECRET="short-but-secret-value")
        r = self.run_bad(pd)
        self.assertEqual(r.returncode, 2)
        self.assertIn("JWT_SECRET", r.stderr)
        self.assertNotIn("short-but-secret-value", r.stderr)

    def test_layout_version_mismatch_refused(self):
        pd = self.make()
        os.makedirs(pd.run_dir)
        seg = "/dev/shm/paymentd." + pd.instance
        with open(seg, "wb") as f:
            f.write((0x50415944).to_bytes(4, "little") + (999).to_bytes(4, "little") + bytes(4088))
        self.addCleanup(lambda: os.path.exists(seg) and os.unlink(seg))
        r = subprocess.run([os.path.join(BIN, "paymentd"), "--role", "worker", "--index", "0"],
                           env=pd.env, capture_output=True, text=True, timeout=20)
        self.assertEqual(r.returncode, 2)
        self.assertIn("layout version", r.stderr)

    def test_sighup_refuses_bad_config_and_applies_good_one(self):
        pd = self.make()
        path = os.path.join(pd.dir, "paymentd.env")
        with open(path, "w") as f:
            f.write("LOG_LEVEL=info\nRESTART_INTENSITY=5\n")
        pd.config_file = path
        pd.start()
        before = {(r["role"], r["index"]): r["pid"] for r in pd.status()}
        with open(path, "w") as f:
            f.write("LOG_LEVEL=info\nRESTART_INTENSITY=many\n")
        pd.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in pd.logs(), 10, what="reload refused")
        self.assertIn("RESTART_INTENSITY", pd.logs())
        time.sleep(0.5)
        self.assertEqual({(r["role"], r["index"]): r["pid"] for r in pd.status()}, before)
        self.assertIsNone(pd.proc.poll())

        with open(path, "w") as f:
            f.write("LOG_LEVEL=debug\nRESTART_INTENSITY=3\n")
        pd.proc.send_signal(signal.SIGHUP)
        # Every role is restarted onto the new configuration, one at a time.
        wait_for(lambda: all(r["state"] == "running" and r["pid"] != before[(r["role"], r["index"])]
                             for r in pd.status()), 60, interval=0.2, what="rolling restart")
        self.assertIn("configuration reloaded", pd.logs())
        self.assertEqual(pd.http("/healthz")[0], 200)


if __name__ == "__main__":
    unittest.main()
