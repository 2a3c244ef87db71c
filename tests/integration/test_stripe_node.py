"""The official stripe npm package, pointed at paymentd, creates, confirms,
retrieves, lists and cancels payment intents, and raises its card-error
class on a decline (tests/node/stripe_client.js)."""
import os
import shutil
import subprocess
import unittest

from harness import SOURCE, Client, Gateway, Paymentd, migrate, new_account, wait_for


class StripeNodeTest(unittest.TestCase):
    def test_stock_stripe_library(self):
        node = shutil.which("node")
        if not node:
            self.skipTest("node is not installed")
        node_dir = os.path.join(SOURCE, "tests", "node")
        self.assertTrue(os.path.isdir(os.path.join(node_dir, "node_modules", "stripe")),
                        "run npm ci in tests/node (scripts/test does)")
        migrate()
        gw = Gateway()
        self.addCleanup(gw.stop)
        pd = Paymentd(GATEWAY_URL=gw.url)
        self.addCleanup(pd.cleanup)
        pd.start()
        wait_for(lambda: pd.json("/readyz")[0] == 200, 20, what="ready")
        _, _, key = new_account("node")
        r = subprocess.run([node, "stripe_client.js"], cwd=node_dir, capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, PAYMENTD_KEY=key, PAYMENTD_PORT=str(pd.port)))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("all checks passed", r.stdout)


if __name__ == "__main__":
    unittest.main()
