"""Starts a real paymentd supervisor for integration tests and talks to it.

Every instance gets its own RUN_DIR, INSTANCE name and free ports, so tests
never collide. PostgreSQL and Redis come from the environment set by
scripts/test (POSTGRES_*, REDIS_*).
"""
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

BIN = os.environ.get("PAYMENTD_BIN", os.path.join(os.path.dirname(__file__), "../../build/bin"))
SOURCE = os.environ.get("PAYMENTD_SOURCE", os.path.join(os.path.dirname(__file__), "../.."))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(predicate, timeout, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (AssertionError, OSError) as e:  # not up yet: keep waiting
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError("timed out after %.1fs waiting for %s (last: %r)" % (timeout, what, last))


def pid_alive(pid):
    """True when pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Paymentd:
    def __init__(self, config_file=None, **overrides):
        base = os.environ.get("PAYMENTD_TEST_TMP") or tempfile.gettempdir()
        self.dir = tempfile.mkdtemp(prefix="pd-", dir=base)
        self.run_dir = os.path.join(self.dir, "run")
        self.port = free_port()
        self.metrics_port = free_port()
        self.instance = "t" + uuid.uuid4().hex[:10]
        self.log_path = os.path.join(self.dir, "paymentd.log")
        self.env = dict(os.environ)
        self.env.update({
            "RUN_DIR": self.run_dir,
            "INSTANCE": self.instance,
            "PORT": str(self.port),
            "METRICS_PORT": str(self.metrics_port),
            "BIND_ADDRESS": "127.0.0.1",
            "METRICS_BIND_ADDRESS": "127.0.0.1",
            "SHUTDOWN_TIMEOUT": "10",
            # Tests drive one account hard; the rate-limit tests set their own limits.
            "RATE_LIMIT_WRITES": "1000000",
            "RATE_LIMIT_READS": "1000000",
            "RATE_LIMIT_AUTH_FAILURES": "1000000",
            # Daemons stopped by signals cannot run leak checks meaningfully.
            "ASAN_OPTIONS": "abort_on_error=1:detect_leaks=0",
        })
        self.env.update({k: str(v) for k, v in overrides.items()})
        self.config_file = config_file
        self.proc = None
        self.log = None

    # ---- lifecycle ----

    def start(self, wait=True):
        self.log = open(self.log_path, "ab")
        argv = [os.path.join(BIN, "paymentd")]
        if self.config_file:
            argv += ["--config", self.config_file]
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self.log, stderr=self.log,
                                     start_new_session=True)
        if wait:
            self.wait_all_running()
        return self

    def wait_all_running(self, timeout=30):
        def ok():
            if self.proc.poll() is not None:
                raise AssertionError("paymentd exited with %s:\n%s" % (self.proc.returncode, self.logs(6000)))
            try:
                rows = self.status()
            except AssertionError:
                return False
            return rows and all(r["state"] == "running" for r in rows) and rows
        return wait_for(ok, timeout, what="every role running")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.kill_leftovers()
        if self.log:
            self.log.close()

    def kill_leftovers(self):
        """Kills any process still running with this instance's RUN_DIR (a failed test's debris)."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open("/proc/%s/environ" % pid, "rb") as f:
                    if ("INSTANCE=%s" % self.instance).encode() in f.read().split(b"\0"):
                        os.kill(int(pid), signal.SIGKILL)
            except (OSError, PermissionError):
                pass

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self, tail=None):
        """The whole log (or its last tail characters, for error messages)."""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-tail:] if tail else text

    # ---- control ----

    def ctl(self, *args, check=True):
        r = subprocess.run([os.path.join(BIN, "paymentctl"), "--run-dir", self.run_dir] + list(args),
                           capture_output=True, text=True, timeout=20,
                           env={k: v for k, v in self.env.items() if k != "RUN_DIR"})
        if check and r.returncode != 0:
            raise AssertionError("paymentctl %s failed (%d): %s %s" % (args, r.returncode, r.stdout, r.stderr))
        return r

    def status(self):
        r = self.ctl("status", check=False)
        if r.returncode != 0:
            raise AssertionError("status failed: " + r.stderr)
        rows = []
        for line in r.stdout.splitlines()[2:]:
            f = line.split()
            rows.append({"role": f[0], "index": int(f[1]), "pid": 0 if f[2] == "-" else int(f[2]),
                         "state": f[3], "restarts": int(f[4]), "last_exit": " ".join(f[6:])})
        return rows

    def role(self, role, index):
        for r in self.status():
            if r["role"] == role and r["index"] == index:
                return r
        raise AssertionError("no %s/%d in status" % (role, index))

    def child_pids(self):
        return [r["pid"] for r in self.status() if r["pid"] > 0]

    # ---- HTTP ----

    def http(self, path, port=None, method="GET", timeout=10):
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            body = resp.read().decode()
            return resp.status, body
        finally:
            conn.close()

    def json(self, path, **kw):
        code, body = self.http(path, **kw)
        return code, json.loads(body)

    def metrics(self):
        code, body = self.http("/metrics", port=self.metrics_port)
        assert code == 200, code
        return body


# ---- payments helpers ----

import urllib.parse  # noqa: E402


def sql(query):
    """Runs one query against the test database; returns rows of strings."""
    env = dict(os.environ)
    r = subprocess.run(["psql", "-h", env.get("POSTGRES_HOST", "127.0.0.1"),
                        "-p", env.get("POSTGRES_PORT", "5432"), "-U", env.get("POSTGRES_USERNAME", "paymentd"),
                        "-d", env.get("POSTGRES_DATABASE", "paymentd"), "-v", "ON_ERROR_STOP=1",
                        "-qAt", "-F", "\t", "-c", query], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise AssertionError("psql failed: " + r.stderr)
    return [line.split("\t") for line in r.stdout.splitlines() if line]


def ctl_db(*args):
    r = subprocess.run([os.path.join(BIN, "paymentctl")] + list(args), capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError("paymentctl %s: %s" % (args, r.stderr))
    return r.stdout.strip()


def migrate():
    return ctl_db("migrate")


def new_account(name="test"):
    """Creates an account and a key; returns (account public id, internal id, secret key)."""
    acct = ctl_db("create-account", name)
    key = ctl_db("create-key", acct)
    internal = sql("SELECT id FROM accounts WHERE public_id = '%s'" % acct)[0][0]
    return acct, internal, key


class Gateway:
    """A gatewaysim process on a free port."""

    def __init__(self, *args, port=None):
        self.port = port or free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.proc = subprocess.Popen([os.path.join(BIN, "gatewaysim"), "--port", str(self.port)] + list(args),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
        wait_for(lambda: self.request("GET", "/v1/ledger")[0] == 200, 10, what="gatewaysim up")

    def request(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            conn.close()

    def ledger(self):
        return self.request("GET", "/v1/ledger")[1]

    def configure(self, **kw):
        return self.request("POST", "/_config", kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Client:
    """A minimal Stripe-style HTTP client: form bodies, Bearer key."""

    def __init__(self, port, key):
        self.port = port
        self.key = key

    def call(self, method, path, params=None, idem=None, json_body=None, raw=None, headers=None,
             timeout=30):
        h = {"Authorization": "Bearer " + self.key} if self.key else {}
        body = None
        if json_body is not None:
            body = json.dumps(json_body)
            h["Content-Type"] = "application/json"
        elif raw is not None:
            body = raw
            h["Content-Type"] = "application/x-www-form-urlencoded"
        elif params is not None:
            if method == "GET":
                path = path + "?" + urllib.parse.urlencode(params)
            else:
                body = urllib.parse.urlencode(params)
                h["Content-Type"] = "application/x-www-form-urlencoded"
        if idem:
            h["Idempotency-Key"] = idem
        h.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            text = r.read().decode()
            return r.status, text, dict(r.getheaders())
        finally:
            conn.close()

    def post(self, path, params=None, **kw):
        code, text, _ = self.call("POST", path, params or {}, **kw)
        return code, json.loads(text)

    def get(self, path, params=None, **kw):
        code, text, _ = self.call("GET", path, params, **kw)
        return code, json.loads(text)
