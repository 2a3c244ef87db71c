"""paymentctl migrate: applies every migration once, is safe to run twice and
from two hosts at once (advisory lock), and the schema's constraints hold."""
import os
import subprocess
import unittest
import uuid

from harness import BIN, sql


def psql_admin(query):
    env = os.environ
    subprocess.run(["psql", "-h", env.get("POSTGRES_HOST", "127.0.0.1"), "-p", env.get("POSTGRES_PORT", "5432"),
                    "-U", "postgres", "-d", "postgres", "-qAt", "-v", "ON_ERROR_STOP=1", "-c", query],
                   check=True, capture_output=True, timeout=60)


class MigrateTest(unittest.TestCase):
    def test_concurrent_migrations_apply_each_once(self):
        db = "migrate_" + uuid.uuid4().hex[:8]
        psql_admin("CREATE DATABASE %s OWNER paymentd" % db)
        self.addCleanup(psql_admin, "DROP DATABASE IF EXISTS %s" % db)
        env = dict(os.environ, POSTGRES_DATABASE=db)
        procs = [subprocess.Popen([os.path.join(BIN, "paymentctl"), "migrate"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outs):
            self.assertEqual(p.returncode, 0, err)
        applied = sum(o.count("applied ") for o, _ in outs)
        rows = subprocess.run(["psql", "-h", env.get("POSTGRES_HOST", "127.0.0.1"), "-p", env["POSTGRES_PORT"],
                               "-U", "paymentd", "-d", db, "-qAt", "-c",
                               "SELECT version, count(*) FROM schema_migrations GROUP BY version"],
                              capture_output=True, text=True, check=True).stdout.split()
        self.assertTrue(rows)
        self.assertTrue(all(r.endswith("|1") for r in rows), rows)
        self.assertEqual(applied, len(rows))
        r = subprocess.run([os.path.join(BIN, "paymentctl"), "migrate"], env=env, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0)
        self.assertIn("up to date", r.stdout)

    def test_constraints_refuse_bad_money(self):
        subprocess.run([os.path.join(BIN, "paymentctl"), "migrate"], check=True, capture_output=True)
        acct = sql("INSERT INTO accounts (public_id, name) VALUES ('acct_%s', 'c') RETURNING id"
                   % uuid.uuid4().hex[:16])[0][0]
        base = ("INSERT INTO payment_intents (public_id, account_id, amount, currency, status, transition)"
                " VALUES ('pi_c%s', " + acct + ", %s, 'usd', '%s', '%s')")
        bad = [("0", "requires_payment_method", "create"),
               ("-1", "requires_payment_method", "create"),
               ("100", "flying", "create"),
               # the state machine: a payment is not born succeeded, nor without its transition
               ("100", "succeeded", "create"),
               ("100", "requires_payment_method", "confirm")]
        for amount, status, transition in bad:
            with self.assertRaises(AssertionError):
                sql(base % (uuid.uuid4().hex[:8], amount, status, transition))
        with self.assertRaises(AssertionError):
            sql("INSERT INTO payment_intents (public_id, account_id, amount, currency, status)"
                " VALUES ('pi_c%s', %s, 100, 'usd', 'requires_payment_method')" % (uuid.uuid4().hex[:8], acct))
        pid = "pi_c" + uuid.uuid4().hex[:8]
        sql(base % (pid[4:], "100", "requires_payment_method", "create"))
        for change in ("amount_received = 101", "amount_received = 100, amount_refunded = 101",
                       "amount_capturable = 101"):
            with self.assertRaises(AssertionError):
                sql("UPDATE payment_intents SET %s WHERE public_id = '%s'" % (change, pid))


if __name__ == "__main__":
    unittest.main()
