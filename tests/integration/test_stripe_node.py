"""The official stripe npm package, pointed at paymentd, creates, confirms,
retrieves, lists and cancels payment intents, and raises its card-error
class on a decline (tests/node/stripe_client.js), over plain HTTP and over
HTTPS with a test certificate."""
import os
import shutil
import socket
import ssl
import subprocess
import unittest

from harness import SOURCE, Client, Gateway, Paymentd, migrate, new_account, wait_for


class StripeNodeTest(unittest.TestCase):
    def run_client(self, tls=False):
        node = shutil.which("node")
        self.assertTrue(node, "node is not installed (scripts/test installs it)")
        node_dir = os.path.join(SOURCE, "tests", "node")
        self.assertTrue(os.path.isdir(os.path.join(node_dir, "node_modules", "stripe")),
                        "run npm ci in tests/node (scripts/test does)")
        migrate()
        gw = Gateway()
        self.addCleanup(gw.stop)
        pd = Paymentd(GATEWAY_URL=gw.url)
        self.addCleanup(pd.cleanup)
        env = dict(os.environ)
        if tls:
            cert, key = os.path.join(pd.dir, "cert.pem"), os.path.join(pd.dir, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                            "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                           check=True, capture_output=True)
            pd.env.update(TLS_CERT_FILE=cert, TLS_KEY_FILE=key)
            env.update(PAYMENTD_PROTOCOL="https", NODE_EXTRA_CA_CERTS=cert)
        pd.start()
        if not tls:
            wait_for(lambda: pd.json("/readyz")[0] == 200, 20, what="ready")
        _, _, apikey = new_account("node")
        env.update(PAYMENTD_KEY=apikey, PAYMENTD_PORT=str(pd.port))
        r = subprocess.run([node, "stripe_client.js"], cwd=node_dir, capture_output=True, text=True,
                           timeout=120, env=env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("all checks passed", r.stdout)
        return pd, cert if tls else None

    def test_stock_stripe_library(self):
        self.run_client()

    def test_stock_stripe_library_over_https(self):
        pd, cert = self.run_client(tls=True)
        # TLS 1.2 or newer is negotiated; TLS 1.1 is refused.
        ctx = ssl.create_default_context(cafile=cert)
        with socket.create_connection(("127.0.0.1", pd.port)) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                self.assertIn(tls.version(), ("TLSv1.2", "TLSv1.3"))
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(cert)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", pd.port)) as raw:
            with self.assertRaises(ssl.SSLError):
                old.wrap_socket(raw, server_hostname="localhost")


if __name__ == "__main__":
    unittest.main()
