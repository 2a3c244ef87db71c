"""Security at the border, against real PostgreSQL, Redis and gatewaysim:
JWT authentication, rate limits (shared and local), signed gateway
callbacks, input limits, the refusal of card numbers in parameters, and
redaction of card data and secrets."""
import base64
import hashlib
import hmac
import http.client
import json
import os
import socket
import subprocess
import time
import unittest

from harness import BIN, Client, Gateway, Paymentd, free_port, migrate, new_account, sql, wait_for

JWT_SECRET = "jwt-secret-for-tests-0123456789abcdef"
CALLBACK_SECRET = "gwsec_callbacks_0123456789"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims, key=JWT_SECRET, alg="HS256"):
    head = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    signing = ("%s.%s" % (head, body)).encode()
    if alg == "none":
        return "%s.%s." % (head, body)
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    return "%s.%s.%s" % (head, body, b64url(hmac.new(key.encode(), signing, digest).digest()))


def redis_cli(*args):
    return subprocess.run(["redis-cli", "-p", os.environ.get("REDIS_PORT", "6379")] + list(args),
                          capture_output=True, text=True, check=True).stdout


def setUpModule():
    migrate()


class JwtTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.gw = Gateway()
        cls.pd = Paymentd(GATEWAY_URL=cls.gw.url, JWT_SECRET=JWT_SECRET, JWT_ISSUER="https://issuer.example",
                          JWT_AUDIENCE="paymentd").start()
        cls.account, _, _ = new_account("jwt")

    @classmethod
    def tearDownClass(cls):
        cls.pd.cleanup()
        cls.gw.stop()

    def claims(self, **kw):
        c = {"sub": self.account, "iss": "https://issuer.example", "aud": "paymentd",
             "exp": int(time.time()) + 300}
        c.update(kw)
        return {k: v for k, v in c.items() if v is not None}

    def status_with(self, token):
        code, text, _ = Client(self.pd.port, token).call("GET", "/v1/payment_intents")
        return code, json.loads(text)

    def test_valid_token(self):
        code, body = self.status_with(make_jwt(self.claims()))
        self.assertEqual(code, 200, body)
        c = Client(self.pd.port, make_jwt(self.claims(aud=["other", "paymentd"])))
        code, pi = c.post("/v1/payment_intents", {"amount": 500, "currency": "usd"})
        self.assertEqual(code, 200, pi)
        self.assertEqual(sql("SELECT a.public_id FROM payment_intents p JOIN accounts a ON a.id = p.account_id"
                             " WHERE p.public_id = '%s'" % pi["id"]), [[self.account]])

    def test_refused_tokens(self):
        now = int(time.time())
        cases = {
            "alg none": make_jwt(self.claims(), alg="none"),
            "HS512": make_jwt(self.claims(), alg="HS512"),
            "wrong key": make_jwt(self.claims(), key="another-secret-0123456789abcdef0"),
            "expired": make_jwt(self.claims(exp=now - 10)),
            "no exp": make_jwt(self.claims(exp=None)),
            "wrong aud": make_jwt(self.claims(aud="someone-else")),
            "wrong iss": make_jwt(self.claims(iss="https://evil.example")),
            "not yet valid": make_jwt(self.claims(nbf=now + 600)),
            "unknown account": make_jwt(self.claims(sub="acct_0000000000000000")),
            "malformed": "eyJhbGciOiJIUzI1NiJ9.not-json.sig",
            "garbage": "a.b.c",
        }
        for name, token in cases.items():
            with self.subTest(name):
                code, body = self.status_with(token)
                self.assertEqual(code, 401, body)
                self.assertEqual(body["error"]["type"], "invalid_request_error")
        self.assertNotIn(cases["wrong key"], self.pd.logs())

    def test_short_secret_refuses_to_start(self):
        env = dict(self.pd.env, JWT_SECRET="too-short-secret")
        r = subprocess.run([os.path.join(BIN, "paymentd"), "--check"], env=env, capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        self.assertIn("JWT_SECRET", r.stderr + r.stdout)
        self.assertNotIn("too-short-secret", r.stderr + r.stdout)


class KeyRevocationTest(unittest.TestCase):
    def test_revoked_key_is_refused(self):
        gw = Gateway()
        self.addCleanup(gw.stop)
        pd = Paymentd(GATEWAY_URL=gw.url)
        self.addCleanup(pd.cleanup)
        pd.start()
        account, _, key = new_account("revoke")
        ctl = lambda *a: subprocess.run([os.path.join(BIN, "paymentctl")] + list(a), capture_output=True,
                                        text=True, env=pd.env)
        new_key = ctl("create-key", account).stdout.strip()
        self.assertEqual(Client(pd.port, new_key).call("GET", "/v1/payment_intents")[0], 200)
        r = ctl("revoke-key", key)  # the old key, never used here, so not in any cache
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn(key, r.stdout + r.stderr)
        self.assertEqual(Client(pd.port, key).call("GET", "/v1/payment_intents")[0], 401)
        self.assertEqual(Client(pd.port, new_key).call("GET", "/v1/payment_intents")[0], 200)
        self.assertEqual(ctl("revoke-key", key).returncode, 1)  # already revoked


class RateLimitTest(unittest.TestCase):
    def setUp(self):
        redis_cli("DEL", "rl:af:127.0.0.1")
        redis_cli("SCRIPT", "FLUSH")  # the limiter must load its script again (NOSCRIPT path)
        self.gw = Gateway()
        self.addCleanup(self.gw.stop)

    def burst(self, client, n, path="/v1/payment_intents"):
        return [client.call("GET", path) for _ in range(n)]

    def test_shared_limits(self):
        pd = Paymentd(GATEWAY_URL=self.gw.url, RATE_LIMIT_READS=5, RATE_LIMIT_WRITES=5,
                      RATE_LIMIT_AUTH_FAILURES=10)
        self.addCleanup(pd.cleanup)
        pd.start()
        _, _, key_a = new_account("rl-a")
        _, _, key_b = new_account("rl-b")
        a, b = Client(pd.port, key_a), Client(pd.port, key_b)
        time.sleep(1 - time.time() % 1)  # start at a window's beginning
        answers = self.burst(a, 12)
        codes = [r[0] for r in answers]
        self.assertIn(429, codes)
        self.assertLessEqual(codes.count(200), 10)  # 5 per second, the burst may straddle two
        limited = [r for r in answers if r[0] == 429][0]
        self.assertEqual(json.loads(limited[1])["error"]["code"], "rate_limit")
        self.assertGreaterEqual(int(limited[2]["Retry-After"]), 1)
        self.assertEqual(b.call("GET", "/v1/payment_intents")[0], 200)  # another account is not affected
        time.sleep(1.2)
        self.assertEqual(a.call("GET", "/v1/payment_intents")[0], 200)  # the window passed
        self.assertRegex(pd.metrics(), r'paymentd_rate_limited_total\{class="read"\} [1-9]')
        self.assertIn("paymentd_rate_limit_local_total 0", pd.metrics())  # Redis decided, not the fallback

        # Ten wrong keys from one IP: then even the right key gets 429.
        bad = Client(pd.port, "sk_test_wrongwrongwrongwrong")
        for i in range(10):
            self.assertEqual(bad.call("GET", "/v1/payment_intents")[0], 401, i)
        code, text, headers = a.call("GET", "/v1/payment_intents")
        self.assertEqual(code, 429, text)
        self.assertLessEqual(int(headers["Retry-After"]), 60)
        redis_cli("DEL", "rl:af:127.0.0.1")
        self.assertEqual(a.call("GET", "/v1/payment_intents")[0], 200)

    def test_local_limiter_without_redis(self):
        pd = Paymentd(GATEWAY_URL=self.gw.url, REDIS_PORT=free_port(), RATE_LIMIT_READS=10, API_PROCESSES=2)
        self.addCleanup(pd.cleanup)
        pd.start()
        _, _, key = new_account("rl-local")
        c = Client(pd.port, key)
        time.sleep(1 - time.time() % 1)
        codes = [r[0] for r in self.burst(c, 40)]
        self.assertIn(429, codes)  # never unlimited
        self.assertLessEqual(codes.count(200), 20)  # each process allows its share, 5 per second
        self.assertRegex(pd.metrics(), r"paymentd_rate_limit_local_total [1-9]")


class CallbackTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.port = free_port()
        cls.gw = Gateway("--callback-url", "http://127.0.0.1:%d/v1/gateway_webhooks/sim" % cls.port,
                         "--callback-secret", CALLBACK_SECRET, "--callback-delay-ms", "3000", "--async-capture")
        cls.pd = Paymentd(GATEWAY_URL=cls.gw.url, GATEWAY_WEBHOOK_SECRET="old-secret-0123456789|" + CALLBACK_SECRET)
        cls.pd.port = cls.port
        cls.pd.env["PORT"] = str(cls.port)
        cls.pd.start()
        _, _, key = new_account("callbacks")
        cls.c = Client(cls.port, key)

    @classmethod
    def tearDownClass(cls):
        cls.pd.cleanup()
        cls.gw.stop()

    def post(self, body, t=None, secret=CALLBACK_SECRET, header=True, tamper=False, extra_v1=None):
        raw = json.dumps(body).encode()
        t = int(time.time()) if t is None else t
        sig = hmac.new(secret.encode(), b"%d." % t + raw, hashlib.sha256).hexdigest()
        h = {"Content-Type": "application/json"}
        if header:
            h["Gateway-Signature"] = "t=%d,%sv1=%s" % (t, "v1=%s," % extra_v1 if extra_v1 else "", sig)
        if tamper:
            raw = raw.replace(b"charge.", b"charge,")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", "/v1/gateway_webhooks/sim", raw, h)
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    def requires_action_payment(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 4321, "currency": "usd",
                                                       "payment_method": "pm_card_authenticationRequired",
                                                       "confirm": "true", "capture_method": "manual"})
        self.assertEqual((code, pi["status"]), (200, "requires_action"), pi)
        return pi

    def state(self, pi):
        return self.c.get("/v1/payment_intents/" + pi["id"])[1]["status"]

    def events(self, pi):
        return [r[0] for r in sql("SELECT type FROM outbox WHERE aggregate_id = '%s' ORDER BY id" % pi["id"])]

    def test_signed_callback_applied_once(self):
        # Manual capture: the authorization is reported here long before
        # gatewaysim's own callback (3 s), which then changes nothing.
        pi = self.requires_action_payment()
        ev = {"id": "gwevt_%d" % time.time_ns(), "type": "charge.succeeded",
              "data": {"object": {"id": pi["latest_charge"], "captured": False,
                                  "status": "requires_capture"}}}
        before = self.events(pi)
        # Refused, and nothing changes: a changed byte, old and future timestamps, no header.
        self.assertEqual(self.post(ev, tamper=True)[0], 401)
        self.assertEqual(self.post(ev, t=int(time.time()) - 301)[0], 401)
        self.assertEqual(self.post(ev, t=int(time.time()) + 301)[0], 401)
        self.assertEqual(self.post(ev, header=False)[0], 400)
        self.assertEqual(self.post(ev, secret="not-the-secret-0123456789")[0], 401)
        self.assertEqual(self.state(pi), "requires_action")
        self.assertEqual(self.events(pi), before)
        # A valid signature (among others, as during a rotation) is applied once.
        code, body = self.post(ev, extra_v1="0" * 64)
        self.assertEqual((code, body.get("applied")), (200, True), body)
        self.assertEqual(self.state(pi), "requires_capture")
        authorized = before + ["payment_intent.amount_capturable_updated"]
        self.assertEqual(self.events(pi), authorized)
        code, body = self.post(ev)
        self.assertEqual((code, body.get("duplicate")), (200, True), body)
        self.assertEqual(self.events(pi), authorized)
        # A failure reported for the authorization does not wipe it.
        late = {"id": "gwevt_late_%d" % time.time_ns(), "type": "charge.failed",
                "data": {"object": {"id": pi["latest_charge"], "failure_code": "card_declined"}}}
        code, body = self.post(late)
        self.assertEqual((code, body.get("applied")), (200, False), body)
        self.assertEqual(self.state(pi), "requires_capture")
        self.assertIn("ignored: the payment is requires_capture", self.pd.logs())
        self.assertRegex(self.pd.metrics(), r'paymentd_gateway_callbacks_total\{result="ignored_final_state"\} [1-9]')
        # A charge nobody holds: 404, so the gateway sends it again later.
        unknown = {"id": "gwevt_u%d" % time.time_ns(), "type": "charge.succeeded",
                   "data": {"object": {"id": "ch_unknown"}}}
        self.assertEqual(self.post(unknown)[0], 404)

    def test_gatewaysim_completes_authentication_later(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 2468, "currency": "usd",
                                                       "payment_method": "pm_card_authenticationRequired",
                                                       "confirm": "true"})
        self.assertEqual((code, pi["status"]), (200, "requires_action"), pi)
        wait_for(lambda: self.state(pi) == "succeeded", 20, interval=0.2, what="callback applied")
        got = self.c.get("/v1/payment_intents/" + pi["id"])[1]
        self.assertEqual(got["amount_received"], 2468)
        self.assertEqual(self.events(pi)[-1], "payment_intent.succeeded")


    def test_capture_settles_later(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 3000, "currency": "usd",
                                                       "payment_method": "pm_card_visa", "confirm": "true",
                                                       "capture_method": "manual"})
        self.assertEqual((code, pi["status"]), (200, "requires_capture"), pi)
        code, got = self.c.post("/v1/payment_intents/%s/capture" % pi["id"], {"amount_to_capture": 2500})
        # Accepted, not settled: in flight, as Stripe shows it.
        self.assertEqual((code, got["status"]), (200, "processing"), got)
        wait_for(lambda: self.state(pi) == "succeeded", 20, interval=0.2, what="capture settled by callback")
        got = self.c.get("/v1/payment_intents/" + pi["id"])[1]
        self.assertEqual(got["amount_received"], 2500)
        self.assertEqual(self.events(pi)[-1], "payment_intent.succeeded")
        self.assertEqual(sql("SELECT t.type, t.status, t.amount FROM payment_transactions t JOIN payment_intents p"
                             " ON p.id = t.payment_intent_id WHERE p.public_id = '%s' ORDER BY t.id DESC LIMIT 1"
                             % pi["id"]), [["capture", "succeeded", "2500"]])


class LimitsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.gw = Gateway()
        cls.pd = Paymentd(GATEWAY_URL=cls.gw.url, REQUEST_TIMEOUT_MS=1000).start()
        _, _, key = new_account("limits")
        cls.c = Client(cls.pd.port, key)

    @classmethod
    def tearDownClass(cls):
        cls.pd.cleanup()
        cls.gw.stop()

    def tearDown(self):
        self.assertEqual(self.pd.http("/healthz")[0], 200)  # the process stays healthy

    def create(self, params=None, **kw):
        base = {"amount": 100, "currency": "usd"}
        base.update(params or {})
        return self.c.call("POST", "/v1/payment_intents", base, **kw)

    def test_oversize_body(self):
        # The answer comes as soon as the declared length is seen, before the body is read.
        s = socket.create_connection(("127.0.0.1", self.pd.port))
        s.sendall(b"POST /v1/payment_intents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n"
                  % (self.c.key.encode(), 2 * 1024 * 1024))
        s.settimeout(10)
        head = s.recv(4096)
        s.close()
        self.assertTrue(head.startswith(b"HTTP/1.1 413"), head)

    def test_oversize_headers(self):
        code, text, _ = self.create(headers={"X-Padding": "y" * 20000})
        self.assertEqual(code, 431, text)

    def test_deep_json_and_too_many_parameters(self):
        deep = {"amount": 100, "currency": "usd", "metadata": {}}
        node = deep["metadata"]
        for _ in range(20):
            node["a"] = {}
            node = node["a"]
        self.assertEqual(self.c.call("POST", "/v1/payment_intents", json_body=deep)[0], 400)
        many = {"metadata[k%d]" % i: "v" for i in range(300)}
        self.assertEqual(self.create(many)[0], 400)

    def test_metadata_limits(self):
        for name, md in {"51 keys": {"metadata[k%d]" % i: "v" for i in range(51)},
                         "41-char key": {"metadata[%s]" % ("k" * 41): "v"},
                         "501-char value": {"metadata[k]": "v" * 501}}.items():
            with self.subTest(name):
                code, text, _ = self.create(md)
                self.assertEqual(code, 400, text)
                self.assertTrue(json.loads(text)["error"]["param"].startswith("metadata"), text)
        self.assertEqual(self.create({"metadata[k]": "v" * 500})[0], 200)

    def test_read_only_fields(self):
        for field, value in (("status", "succeeded"), ("amount_received", "100"), ("id", "pi_mine"),
                             ("object", "payment_intent"), ("livemode", "true")):
            with self.subTest(field):
                code, text, _ = self.create({field: value})
                self.assertEqual(code, 400, text)
                err = json.loads(text)["error"]
                self.assertEqual((err["code"], err["param"]), ("parameter_unknown", field))

    def test_long_strings(self):
        self.assertEqual(self.create({"description": "d" * 5001})[0], 400)

    def test_slow_client_is_cut_off(self):
        s = socket.create_connection(("127.0.0.1", self.pd.port))
        s.sendall(b"POST /v1/payment_intents HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\namount=1")
        s.settimeout(10)
        t0 = time.monotonic()
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        elapsed = time.monotonic() - t0
        s.close()
        self.assertLess(elapsed, 8)  # cut off after about REQUEST_TIMEOUT_MS, not left hanging
        self.assertFalse(data.startswith(b"HTTP/1.1 200"), data)


class CardNumberTest(unittest.TestCase):
    """A card number in any parameter, form or JSON, is refused with 400
    naming the parameter, and leaves nothing behind: no payment, no
    idempotency key (in PostgreSQL or Redis), no charge at the gateway."""

    CARD = "4242424242424242"

    @classmethod
    def setUpClass(cls):
        cls.gw = Gateway()
        cls.pd = Paymentd(GATEWAY_URL=cls.gw.url).start()
        _, cls.internal, key = new_account("cards")
        cls.c = Client(cls.pd.port, key)

    @classmethod
    def tearDownClass(cls):
        cls.pd.cleanup()
        cls.gw.stop()

    def snapshot(self):
        return (sql("SELECT count(*) FROM payment_intents WHERE account_id = %s" % self.internal),
                self.gw.ledger())

    def assert_key_unused(self, key):
        self.assertEqual(sql("SELECT count(*) FROM idempotency_keys WHERE account_id = %s"
                             " AND idempotency_key = '%s'" % (self.internal, key)), [["0"]])
        redis_key = "idem:%s:%s" % (self.internal, hashlib.sha256(key.encode()).hexdigest()[:32])
        self.assertEqual(redis_cli("EXISTS", redis_key).strip(), "0")

    def assert_refused(self, answer, param):
        code, text, _ = answer
        self.assertEqual(code, 400, text)
        err = json.loads(text)["error"]
        self.assertEqual((err["type"], err["code"]), ("invalid_request_error", "parameter_invalid"), text)
        if param is None:
            self.assertNotIn("param", err)
        else:
            self.assertEqual(err["param"], param, text)
        digits = self.CARD[:4] + "[ -]?" + self.CARD[4:8]
        self.assertNotRegex(text, digits)

    def refuse_all(self, key, cases, json_body=False):
        before = self.snapshot()
        for name, (params, param) in cases.items():
            with self.subTest(name):
                body = dict({"amount": 1000, "currency": "usd"}, **params)
                if json_body:
                    answer = self.c.call("POST", "/v1/payment_intents", json_body=body, idem=key)
                else:
                    answer = self.c.call("POST", "/v1/payment_intents", body, idem=key)
                self.assert_refused(answer, param)
        self.assertEqual(self.snapshot(), before)
        self.assert_key_unused(key)
        # The key was never claimed: valid parameters under it go through, once.
        body = {"amount": 1000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
        if json_body:
            first = self.c.call("POST", "/v1/payment_intents", json_body=body, idem=key)
        else:
            body["confirm"] = "true"
            first = self.c.call("POST", "/v1/payment_intents", body, idem=key)
        self.assertEqual(first[0], 200, first[1])
        pi = json.loads(first[1])
        self.assertEqual(pi["status"], "succeeded", pi)
        again = self.c.call("POST", "/v1/payment_intents", json_body=body, idem=key) if json_body else \
            self.c.call("POST", "/v1/payment_intents", body, idem=key)
        self.assertEqual((again[0], again[2].get("Idempotent-Replayed")), (200, "true"), again[1])
        self.assertEqual(json.loads(again[1])["id"], pi["id"])
        self.assertEqual(int(self.snapshot()[0][0][0]), int(before[0][0][0]) + 1)

    def test_form_parameters(self):
        card = self.CARD
        self.refuse_all("card-form-%d" % time.time_ns(), {
            "payment_method": ({"payment_method": card, "confirm": "true"}, "payment_method"),
            "metadata value": ({"metadata[note]": card}, "metadata[note]"),
            "description": ({"description": "card %s thanks" % card}, "description"),
            "customer": ({"customer": card}, "customer"),
            "spaces": ({"metadata[note]": "4242 4242 4242 4242"}, "metadata[note]"),
            "dashes": ({"description": "4242-4242-4242-4242"}, "description"),
            "19 digits": ({"metadata[ref]": "4000000000000000006"}, "metadata[ref]"),
            "metadata key": ({"metadata[%s]" % card: "x"}, "metadata"),
            "grouped key": ({"metadata[card %s]" % card: "x"}, "metadata"),
            "array": ({"payment_method_types[0]": "card", "payment_method_types[1]": card},
                      "payment_method_types[1]"),
            "unknown nested": ({"card[number]": card, "card[cvc]": "123"}, "card[number]"),
            "top-level key": ({card: "x"}, None),
        })

    def test_json_bodies(self):
        card = self.CARD
        self.refuse_all("card-json-%d" % time.time_ns(), {
            "payment_method": ({"payment_method": card, "confirm": True}, "payment_method"),
            "metadata value": ({"metadata": {"note": card}}, "metadata[note]"),
            "metadata number": ({"metadata": {"note": int(card)}}, "metadata[note]"),
            "description": ({"description": "card %s thanks" % card}, "description"),
            "customer": ({"customer": card}, "customer"),
            "metadata key": ({"metadata": {card: "x"}}, "metadata"),
            "nested arrays": ({"x": [["a"], ["b", {"c": ["4242-4242-4242-4242"]}]]}, "x[1][1][c][0]"),
        }, json_body=True)

    def test_not_card_numbers(self):
        # Luhn-invalid 16 digits, a 12-digit number and ordinary ids are left alone.
        code, pi = self.c.post("/v1/payment_intents", {
            "amount": 1000, "currency": "usd", "metadata[order]": "4242424242424241",
            "metadata[ref]": "424242424242", "description": "order 1234567890123"})
        self.assertEqual(code, 200, pi)
        self.assertEqual(pi["metadata"], {"order": "4242424242424241", "ref": "424242424242"})

    def test_update_confirm_and_queries(self):
        code, pi = self.c.post("/v1/payment_intents", {"amount": 700, "currency": "usd",
                                                       "metadata[note]": "kept"})
        self.assertEqual(code, 200, pi)
        path = "/v1/payment_intents/" + pi["id"]
        before = self.snapshot()
        self.assert_refused(self.c.call("POST", path, {"metadata[note]": self.CARD}), "metadata[note]")
        self.assert_refused(self.c.call("POST", path + "/confirm", {"payment_method": self.CARD}),
                            "payment_method")
        self.assert_refused(self.c.call("GET", "/v1/payment_intents", {"customer": self.CARD}), "customer")
        self.assertEqual(self.snapshot(), before)
        code, got = self.c.get(path)
        self.assertEqual((got["status"], got["metadata"]), ("requires_payment_method", {"note": "kept"}), got)


class RedactionTest(unittest.TestCase):
    """Card numbers, CVVs, keys, JWTs and secrets sent in every field a client
    can reach never come back in an error, a log line or a metric."""

    CARDS = ["4242424242424242", "4000056655665556", "5555555555554444", "378282246310005"]
    CVV = "8731"

    def test_nothing_sensitive_leaks(self):
        gw = Gateway()
        self.addCleanup(gw.stop)
        pd = Paymentd(GATEWAY_URL=gw.url, JWT_SECRET=JWT_SECRET, LOG_LEVEL="debug",
                      WEBHOOK_ALLOW_PRIVATE=1)
        self.addCleanup(pd.cleanup)
        pd.start()
        account, _, key = new_account("redaction")
        c = Client(pd.port, key)
        code, we = c.post("/v1/webhook_endpoints", {"url": "http://127.0.0.1:9/hook", "enabled_events[0]": "*"})
        self.assertEqual(code, 200)
        jwt = make_jwt({"sub": account, "exp": int(time.time()) + 300})
        secrets = self.CARDS + [key, jwt, we["secret"], "sk_test_" + "z" * 24]
        spaced = "4242 4242 4242 4242"
        errors = []

        def call(*a, **kw):
            code, text, _ = c.call(*a, **kw)
            if code >= 400:
                errors.append(text)
            return code

        for card in self.CARDS + [spaced]:
            call("GET", "/v1/payment_intents/" + card.replace(" ", ""))
            call("POST", "/v1/payment_intents", {"amount": 100, "currency": "usd", card: "x"})
            call("POST", "/v1/payment_intents", {"amount": 100, "currency": "usd",
                                                 "card[number]": card, "card[cvc]": self.CVV})
            call("POST", "/v1/payment_intents", {"amount": card, "currency": "usd"})
            call("POST", "/v1/payment_intents", {"amount": 100, "currency": card})
            call("POST", "/v1/payment_intents", {"amount": 100, "currency": "usd", "payment_method": card})
            call("POST", "/v1/payment_intents", {"amount": 100, "currency": "usd", "customer": card,
                                                 "description": card, "metadata[card]": card,
                                                 "metadata[cvc]": self.CVV})
            call("GET", "/v1/payment_intents", {"customer": card, "limit": card})
            call("POST", "/v1/payment_intents", {"amount": 100, "currency": "usd"}, idem=card)
            call("POST", "/v1/payment_intents", {"amount": 101, "currency": "usd"}, idem=card)  # mismatch
            call("POST", "/v1/payment_intents", {"amount": 100, "currency": "usd"},
                 headers={"X-Card": card, "User-Agent": card})
            for auth in ("Bearer " + card, "Basic " + base64.b64encode((card + ":").encode()).decode()):
                code, text, _ = Client(pd.port, None).call("GET", "/v1/payment_intents", headers={"Authorization": auth})
                errors.append(text)
        for s in (key, jwt, we["secret"]):
            call("GET", "/v1/payment_intents/" + s)
            call("POST", "/v1/payment_intents", {"amount": 100, "currency": "usd", s: "x"})
            call("POST", "/v1/payment_intents", {"amount": 100, "currency": s})
            call("POST", "/v1/payment_intents", {"amount": 100, "currency": "usd"}, idem=s)
            call("POST", "/v1/payment_intents", {"amount": 102, "currency": "usd"}, idem=s)
        bad_jwt = make_jwt({"sub": account, "exp": 1}, key=JWT_SECRET)
        code, text, _ = Client(pd.port, bad_jwt).call("GET", "/v1/payment_intents")
        self.assertEqual(code, 401)
        errors.append(text)
        secrets.append(bad_jwt)
        time.sleep(1)
        logs = pd.logs()
        metrics = pd.metrics()
        self.assertGreater(len(errors), 50)
        for s in secrets + [spaced, JWT_SECRET]:  # the server's own secret is never sent, never shown
            with self.subTest(secret=s[:12]):
                self.assertNotIn(s, logs)
                self.assertNotIn(s, metrics)
                for e in errors:
                    self.assertNotIn(s, e)
        for where, text in (("logs", logs), ("metrics", metrics), ("errors", "\n".join(errors))):
            self.assertNotRegex(text, r"(?<![0-9])%s(?![0-9])" % self.CVV, where)


if __name__ == "__main__":
    unittest.main()
