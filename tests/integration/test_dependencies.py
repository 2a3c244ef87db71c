"""Dependencies going away and coming back, with a private PostgreSQL of this
test's own: writes answer 503 with Retry-After quickly while it is down,
/healthz stays 200, and service resumes by itself when it is back."""
import os
import shutil
import subprocess
import tempfile
import time
import unittest

from harness import BIN, SOURCE, Client, Gateway, Paymentd, free_port, wait_for


def lib(script, timeout=120):
    r = subprocess.run(["bash", "-c", "source %s/scripts/lib.sh; %s" % (SOURCE, script)],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError("%s: %s %s" % (script, r.stdout, r.stderr))


class PostgresRestartTest(unittest.TestCase):
    def test_service_resumes_when_postgres_is_back(self):
        base = os.environ.get("PAYMENTD_TEST_TMP") or tempfile.gettempdir()
        d = tempfile.mkdtemp(prefix="pg-", dir=base)
        os.chmod(d, 0o755)
        self.addCleanup(shutil.rmtree, d, True)
        data, port = os.path.join(d, "data"), free_port()
        lib("pg_start %s %d && pg_ensure_db %d" % (data, port, port))
        self.addCleanup(lib, "pg_stop %s immediate" % data)
        env = dict(os.environ, POSTGRES_PORT=str(port))
        run = lambda *a: subprocess.run([os.path.join(BIN, "paymentctl")] + list(a), env=env, check=True,
                                        capture_output=True, text=True).stdout.strip()
        run("migrate")
        key = run("create-key", run("create-account", "pgdown"))
        gw = Gateway()
        self.addCleanup(gw.stop)
        pd = Paymentd(POSTGRES_PORT=port, GATEWAY_URL=gw.url)
        self.addCleanup(pd.cleanup)
        pd.start()
        c = Client(pd.port, key)
        body = {"amount": 100, "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}
        self.assertEqual(c.post("/v1/payment_intents", body)[0], 200)

        lib("pg_stop %s fast" % data)
        t0 = time.monotonic()
        code, text, headers = c.call("POST", "/v1/payment_intents", body)
        self.assertLess(time.monotonic() - t0, 3.0)
        self.assertEqual((code, headers.get("Retry-After")), (503, "1"), text)
        self.assertEqual(pd.http("/healthz")[0], 200)
        self.assertEqual(pd.json("/readyz")[0], 503)

        lib("pg_start %s %d" % (data, port))
        wait_for(lambda: c.post("/v1/payment_intents", body)[0] == 200, 30, interval=0.5,
                 what="service resumed after PostgreSQL came back")
        wait_for(lambda: pd.json("/readyz")[0] == 200, 15, what="ready again")


if __name__ == "__main__":
    unittest.main()
