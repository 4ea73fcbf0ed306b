"""Benchmark (not a test): what the gateway costs, against the backend called directly.

Run after ``make lab`` (lab-01 serves the model behind the gateway):

    sudo .venv/bin/python bench/gateway.py [--requests 2000] [--threads 4]

On lab-01 itself, in one run, one Python client calls ``GET /v1/models`` (the backend's
cheapest route, so the figures are the proxy's cost, not the model's) ``--requests`` times
from ``--threads`` threads, first on the backend (http://127.0.0.1:8080) and then through the
gateway (https://<lab-01 address>:8443, TLS verified against the lab's Vault CA, the bench client's
key): once with a new connection per request (as a curl loop would: each pays a TLS
handshake), once with one keep-alive connection per thread (as an API client's pool does).
It prints p50 and p99 latency and requests/s of both and their ratios, then one short chat
completion each way, to set the overhead against a real generation.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpunode.commands import lab_front_door as door  # noqa: E402

STATE = REPO / ".lab" / "lab"

# Runs on lab-01 (python3 of Debian 12); reads the CA PEM and the key on stdin.
CLIENT = r"""
import http.client, json, ssl, statistics, sys, threading, time
ca = sys.stdin.read().split("\n--key--\n")
key = ca[1].strip()
ctx = ssl.create_default_context(cadata=ca[0])
N, T = int(sys.argv[1]), int(sys.argv[2])

def connect(tls):
    if tls:
        return http.client.HTTPSConnection(ADDRESS, GATEWAY, context=ctx, timeout=120)
    return http.client.HTTPConnection("127.0.0.1", BACKEND, timeout=120)

def one(tls, path, body=None, conn=None):
    own = conn is None
    conn = conn or connect(tls)
    headers = {"Authorization": "Bearer " + key} if tls else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    t = time.perf_counter()
    conn.request("POST" if body else "GET", path, body=body, headers=headers)
    resp = conn.getresponse(); resp.read()
    if own: conn.close()
    assert resp.status == 200, resp.status
    return time.perf_counter() - t

def run(tls, keepalive=False):
    lat, lock = [], threading.Lock()
    def worker(n):
        conn = connect(tls) if keepalive else None
        for _ in range(n):
            d = one(tls, "/v1/models", conn=conn)
            with lock: lat.append(d)
    for _ in range(20): one(tls, "/v1/models")  # warm-up
    threads = [threading.Thread(target=worker, args=(N // T,)) for _ in range(T)]
    t0 = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100)
    return {"n": len(lat), "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "rps": len(lat) / wall}

chat = json.dumps({"model": MODEL, "max_tokens": 8,
                   "messages": [{"role": "user", "content": "Say hi."}]}).encode()
out = {"backend": run(False), "gateway": run(True),
       "backend_ka": run(False, True), "gateway_ka": run(True, True)}
for name, tls in (("chat_backend_ms", False), ("chat_gateway_ms", True)):
    out[name] = statistics.median(one(tls, "/v1/chat/completions", chat) for _ in range(5)) * 1e3
print(json.dumps(out))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    info = json.loads((STATE / "gateway.json").read_text())
    stdin = (
        Path(info["ca_file"]).read_text()
        + "\n--key--\n"
        + (STATE / f"gateway-{door.BENCH_CLIENT}.key").read_text()
    )
    script = (
        CLIENT.replace("GATEWAY", str(door.GATEWAY_PORT))
        .replace("BACKEND", str(door.SERVICE_PORT))
        .replace("MODEL", repr(door.SERVED_NAME))
        .replace("ADDRESS", repr(info["url"].removeprefix("https://").rsplit(":", 1)[0]))
    )
    ssh = ["ssh", "-F", str(STATE / "ssh_config"), door.HOST]
    subprocess.run([*ssh, "cat > /tmp/gpunode-bench.py"], input=script, text=True, check=True)
    proc = subprocess.run(
        [*ssh, f"python3 /tmp/gpunode-bench.py {args.requests} {args.threads}"],
        input=stdin,
        text=True,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    r = json.loads(proc.stdout)
    print(
        f"# gateway benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
        f"{args.requests} requests x {args.threads} threads, GET /v1/models, on lab-01"
    )
    for title, suffix in (("a new connection per request", ""), ("keep-alive", "_ka")):
        b, g = r[f"backend{suffix}"], r[f"gateway{suffix}"]
        print(f"{title:30} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
        for name, x in (("backend (http, direct)", b), ("gateway (https, key)", g)):
            print(f"  {name:28} {x['p50_ms']:8.2f} {x['p99_ms']:8.2f} {x['rps']:8.0f}")
        print(
            f"  {'ratio gateway / backend':28} {g['p50_ms'] / b['p50_ms']:8.2f} "
            f"{g['p99_ms'] / b['p99_ms']:8.2f} {g['rps'] / b['rps']:8.2f}"
        )
    print(
        f"chat completion (8 tokens), median of 5: backend {r['chat_backend_ms']:.0f} ms, "
        f"gateway {r['chat_gateway_ms']:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
