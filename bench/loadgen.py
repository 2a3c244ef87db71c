#!/usr/bin/env python3
"""Load generator for scripts/bench: open-model (constant arrival rate)
scenarios and bursts of concurrent payments, which a closed-loop tool such as
wrk cannot produce.

Latency is measured from each request's *scheduled* start, so a server that
falls behind shows it (no coordinated omission). Prints one JSON object.

  loadgen.py open   --port P --key K --rate R --duration S [--mix | --replay-key IK]
  loadgen.py burst  --port P --key K --count N
"""
import argparse
import asyncio
import json
import random
import resource
import sys
import time
import urllib.parse


class Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer


class Client:
    def __init__(self, port, key, max_conns):
        self.port, self.key = port, key
        self.idle = []
        self.open = 0
        self.max_conns = max_conns
        self.waiters = []

    async def acquire(self):
        if self.idle:
            return self.idle.pop()
        if self.open < self.max_conns:
            self.open += 1
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
            except Exception:
                self.open -= 1
                raise
            return Conn(r, w)
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        return await fut

    def release(self, conn, healthy):
        if not healthy:
            self.open -= 1
            conn.writer.close()
            return
        if self.waiters:
            self.waiters.pop(0).set_result(conn)
        else:
            self.idle.append(conn)

    async def request(self, method, path, params=None, idem=None):
        body = urllib.parse.urlencode(params or {}) if method == "POST" else ""
        if method == "GET" and params:
            path += "?" + urllib.parse.urlencode(params)
        head = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1",
                "Authorization: Bearer " + self.key]
        if method == "POST":
            head += ["Content-Type: application/x-www-form-urlencoded", "Content-Length: %d" % len(body)]
        if idem:
            head.append("Idempotency-Key: " + idem)
        data = ("\r\n".join(head) + "\r\n\r\n" + body).encode()
        conn = await self.acquire()
        healthy = False
        try:
            conn.writer.write(data)
            status_line = await conn.reader.readline()
            status = int(status_line.split()[1])
            length = 0
            while True:
                line = await conn.reader.readline()
                if line in (b"\r\n", b""):
                    break
                k, _, v = line.decode().partition(":")
                if k.lower() == "content-length":
                    length = int(v)
                if k.lower() == "connection" and v.strip().lower() == "close":
                    healthy = False
            payload = await conn.reader.readexactly(length) if length else b""
            healthy = True
            return status, payload
        finally:
            self.release(conn, healthy)


def percentiles(lat):
    if not lat:
        return {}
    lat = sorted(lat)
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2)
    return {"p50_ms": pick(0.50), "p95_ms": pick(0.95), "p99_ms": pick(0.99), "max_ms": round(lat[-1] * 1000, 2)}


class Recorder:
    def __init__(self):
        self.lat, self.errors, self.done = [], 0, 0
        self.recent = []

    def ok(self, scheduled):
        self.lat.append(time.monotonic() - scheduled)
        self.done += 1


async def flow_create_confirm(c, rec, scheduled):
    st, body = await c.request("POST", "/v1/payment_intents", {"amount": random.randint(100, 99999), "currency": "usd"},
                               idem="lg-%d-%d" % (random.getrandbits(48), time.monotonic_ns()))
    if st != 200:
        rec.errors += 1
        return
    pi = json.loads(body)["id"]
    rec.recent.append(pi)
    if len(rec.recent) > 1000:
        rec.recent.pop(0)
    st, _ = await c.request("POST", "/v1/payment_intents/%s/confirm" % pi, {"payment_method": "pm_card_visa"})
    if st != 200:
        rec.errors += 1
        return
    rec.ok(scheduled)


async def flow_status(c, rec, scheduled):
    if rec.recent and random.random() < 0.67:
        st, _ = await c.request("GET", "/v1/payment_intents/" + random.choice(rec.recent))
    else:
        st, _ = await c.request("GET", "/v1/payment_intents", {"limit": 10})
    if st != 200:
        rec.errors += 1
        return
    rec.ok(scheduled)


async def flow_create_cancel(c, rec, scheduled):
    st, body = await c.request("POST", "/v1/payment_intents", {"amount": 500, "currency": "eur"})
    if st != 200:
        rec.errors += 1
        return
    st, _ = await c.request("POST", "/v1/payment_intents/%s/cancel" % json.loads(body)["id"],
                            {"cancellation_reason": "abandoned"})
    if st != 200:
        rec.errors += 1
        return
    rec.ok(scheduled)


async def flow_healthz(c, rec, scheduled):
    st, _ = await c.request("GET", "/healthz")
    if st != 200:
        rec.errors += 1
        return
    rec.ok(scheduled)


async def flow_one_call(c, rec, scheduled):
    st, body = await c.request("POST", "/v1/payment_intents",
                               {"amount": 1500, "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"},
                               idem="lg-%d-%d" % (random.getrandbits(48), time.monotonic_ns()))
    if st != 200:
        rec.errors += 1
        return
    rec.ok(scheduled)


async def flow_replay(c, rec, scheduled):
    st, _ = await c.request("POST", "/v1/payment_intents",
                            {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"},
                            idem=REPLAY_KEY[0])
    if st != 200:
        rec.errors += 1
        return
    rec.ok(scheduled)


REPLAY_KEY = [None]

MIX = [(0.70, flow_create_confirm), (0.15, flow_status), (0.10, flow_create_cancel), (0.05, flow_healthz)]


def pick_mix():
    x, acc = random.random(), 0.0
    for w, f in MIX:
        acc += w
        if x < acc:
            return f
    return MIX[-1][1]


async def guarded(flow, c, rec, scheduled):
    try:
        await flow(c, rec, scheduled)
    except Exception:
        rec.errors += 1


async def run_open(args):
    c = Client(args.port, args.key, args.max_conns)
    rec = Recorder()
    tasks = []
    start = time.monotonic() + 0.2
    n = int(args.rate * args.duration)
    for i in range(n):
        scheduled = start + i / args.rate
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        flow = pick_mix() if args.mix else flow_replay if args.replay_key else flow_one_call
        tasks.append(asyncio.create_task(guarded(flow, c, rec, scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    out = {"mode": "mix" if args.mix else "replay" if args.replay_key else "open", "target_rate": args.rate, "flows": n,
           "completed": rec.done, "errors": rec.errors, "flows_per_s": round(rec.done / elapsed, 1)}
    out.update(percentiles(rec.lat))
    return out


async def run_burst(args):
    c = Client(args.port, args.key, args.count)
    rec = Recorder()
    start = time.monotonic()
    await asyncio.gather(*[guarded(flow_one_call, c, rec, start) for _ in range(args.count)])
    out = {"mode": "burst", "count": args.count, "completed": rec.done, "errors": rec.errors,
           "seconds": round(time.monotonic() - start, 2)}
    out.update(percentiles(rec.lat))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["open", "burst"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--mix", action="store_true")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--max-conns", type=int, default=512)
    p.add_argument("--replay-key", help="open model of replays: every request under this Idempotency-Key")
    args = p.parse_args()
    REPLAY_KEY[0] = args.replay_key
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = asyncio.run(run_open(args) if args.mode == "open" else run_burst(args))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
