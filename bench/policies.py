#!/usr/bin/env python3
"""Policy evaluation cost against the number of unrelated policies (issue 4):
a zone controller (release build, embedded store), two agents in controller
mode (web-1 calls api-1 through its L7 proxy, with an HTTPRoute, a Retry and
a TrafficPermission in force), nginx as api's application; then the same
measurement with 10 and with 10,000 policies in the mesh that select other
workloads. The zone compiles per agent only what concerns its workloads, so
the agents' config, latency, throughput and memory should not move.

    bench/policies.py [--duration 10] [--counts 10,10000]

Needs wrk and nginx (nginx-light). No root; loopback only.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from controlplane import BIN, ROOT, Zone, http, rss_kib, wait  # noqa: E402

APP_IP, APP_PORT = "127.0.4.3", 18280
LISTENER = "127.0.0.1:19700"


def token(zone, work, name):
    status, body = http("POST", zone.api + "/v1/tokens", json.dumps(
        {"mesh": "default", "workloads": {"names": [name]}, "ttl": "10m", "maxUses": 1}))
    if status not in (200, 201):
        raise SystemExit(f"token: {status} {body!r}")
    t = json.loads(body)
    path = os.path.join(work, f"{name}.token")
    with open(path, "w") as f:
        f.write(t["secret"])
    return t["caPin"], path


def agent(zone, work, name, service, ip, ports, listeners):
    pin, token_file = token(zone, work, name)
    config = {
        "controller": {"address": zone.grpc, "ca_pin": pin, "token_file": token_file,
                       "state_dir": os.path.join(work, f"{name}-state"), "agent_name": name},
        "workload": {"name": name, "namespace": "default", "service": service,
                     "service_account": service, "address": ip, "ports": ports},
        "inbound": {"listen": f"{ip}:15008", "plaintext_listen": f"{ip}:15006"},
        "outbound": {"capture_listen": f"{ip}:15001", "listeners": listeners},
        "admin": {"listen": f"{ip}:15000"},
        "metrics": {"listen": f"{ip}:15020"},
        "dns": {"enabled": False},
        "log": {"level": "warn"},
    }
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        json.dump(config, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    log = open(os.path.join(work, f"{name}.log"), "w")
    return subprocess.Popen([os.path.join(BIN, "weft-agent"), "run", "-c", path],
                            stdout=log, stderr=log, env=env)


RELATED = """\
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata: { name: api-callers, mesh: default }
spec:
  targetRef: { kind: Service, name: api }
  rules: [ { from: { kind: Service, name: web }, default: { action: Allow, http: [ { method: GET, path: { type: PathPrefix, value: / } } ] } } ]
---
apiVersion: weft.io/v1alpha1
kind: HTTPRoute
metadata: { name: api-route, mesh: default }
spec:
  targetRef: { kind: Service, name: web }
  to:
  - targetRef: { kind: Service, name: api }
    rules: [ { default: { filters: [ { type: RequestHeaderModifier, set: [ { name: x-route, value: api } ] } ] } } ]
---
apiVersion: weft.io/v1alpha1
kind: Retry
metadata: { name: api-retry, mesh: default }
spec:
  targetRef: { kind: Service, name: web }
  to: [ { targetRef: { kind: Service, name: api }, default: { numRetries: 2, retryOn: [ 5xx, ConnectFailure ] } } ]
"""

KINDS = [
    ("TrafficPermission", "  targetRef: {{ kind: Service, name: ghost-{i} }}\n"
     "  rules: [ {{ from: {{ kind: Service, name: other-{i} }}, default: {{ action: Allow }} }} ]\n"),
    ("Retry", "  targetRef: {{ kind: Service, name: ghost-{i} }}\n"
     "  to: [ {{ targetRef: {{ kind: Service, name: api }}, default: {{ numRetries: 1 }} }} ]\n"),
    ("Timeout", "  targetRef: {{ kind: Workload, name: ghost-{i} }}\n"
     "  to: [ {{ targetRef: {{ kind: Mesh }}, default: {{ requestTimeout: 3s }} }} ]\n"),
    ("HTTPRoute", "  targetRef: {{ kind: Labels, labels: {{ app: ghost-{i} }} }}\n"
     "  to: [ {{ targetRef: {{ kind: Service, name: api }}, rules: [ {{ default: {{ backendRefs: [ {{ name: ghost-{i} }} ] }} }} ] }} ]\n"),
]


def unrelated(start, count):
    docs = []
    for i in range(start, start + count):
        kind, spec = KINDS[i % len(KINDS)]
        docs.append(f"apiVersion: weft.io/v1alpha1\nkind: {kind}\nmetadata: {{ name: unrelated-{i}, mesh: default }}\n"
                    f"spec:\n{spec.format(i=i)}")
    return "---\n".join(docs)


def wrk(duration, conns, threads):
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency",
                          f"http://{LISTENER}/"], capture_output=True, text=True, check=True).stdout
    lat, rps, errors = {}, 0.0, 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "90%", "99%"):
            lat[parts[0]] = parts[1]
        if line.startswith("Requests/sec:"):
            rps = float(parts[1])
        if "Non-2xx" in line:
            errors = int(parts[-1])
    return lat, rps, errors


def run(duration, counts):
    work = tempfile.mkdtemp(prefix="weft-policy-bench-")
    os.chmod(work, 0o755)
    procs = []
    try:
        www = os.path.join(work, "www")
        os.makedirs(www)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write("x" * 1024)
        with open(os.path.join(work, "nginx.conf"), "w") as f:
            f.write(f"worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;\n"
                    "events { worker_connections 4096; }\n"
                    f"http {{ access_log off; server {{ listen {APP_IP}:{APP_PORT}; root {www}; "
                    "keepalive_requests 1000000; } }\n")
        procs.append(subprocess.Popen(["nginx", "-c", os.path.join(work, "nginx.conf")]))
        zone = Zone(work)
        procs.append(zone.proc)
        zone.apply("apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: default\n"
                   "spec:\n  trustDomain: bench.weft\n")
        zone.apply(RELATED)
        api = agent(zone, work, "api-1", "api", APP_IP, [{"port": APP_PORT, "protocol": "http"}], [])
        procs.append(api)

        def vip():
            status, body = http("GET", zone.api + "/v1/inspect/services")
            for s in json.loads(body) if status == 200 else []:
                if s.get("name") == "api" and s.get("virtualIp"):
                    return s["virtualIp"]
            return None

        api_vip = wait("api's virtual IP", vip)
        web = agent(zone, work, "web-1", "web", "127.0.4.2", [],
                    [{"listen": LISTENER, "target": f"{api_vip}:{APP_PORT}"}])
        procs.append(web)

        def answered():
            try:
                out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                      f"http://{LISTENER}/"], capture_output=True, text=True, timeout=5)
                return out.stdout == "200"
            except subprocess.TimeoutExpired:
                return False

        wait("web -> api through both agents", answered)
        print(f"# {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())} on {os.cpu_count()} cores, "
              f"wrk {duration}s per figure, 1 KiB body, L7 with HTTPRoute + Retry + TrafficPermission")
        print("| unrelated policies | apply | p50 (1 conn) | p99 | req/s (16 conns) | non-2xx "
              "| agents RSS (web, api) | zone RSS |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        applied = 0
        for count in counts:
            start = time.monotonic()
            zone.apply(unrelated(applied, count - applied))
            took = time.monotonic() - start
            applied = count
            lat, _, _ = wrk(duration, 1, 1)
            _, rps, errors = wrk(duration, 16, 2)
            print(f"| {count:,} | {took:.1f} s | {lat.get('50%')} | {lat.get('99%')} | {rps:,.0f} | {errors} "
                  f"| {rss_kib(web.pid, 'VmRSS') / 1024:.1f}, {rss_kib(api.pid, 'VmRSS') / 1024:.1f} MiB "
                  f"| {rss_kib(zone.proc.pid, 'VmRSS') / 1024:.1f} MiB |", flush=True)
        status, body = http("GET", zone.api + "/v1/inspect/workloads/default/default/web-1/policies")
        shown = json.loads(body) if status == 200 else {}
        print(f"\nweb-1's compiled policy: {len(json.dumps(shown.get('compiled', shown)))} bytes of JSON; "
              f"policies applying to it: {len(shown.get('applied', shown.get('policies', [])))}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--counts", default="10,10000")
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "weft-zone", "-p", "weft-agent"],
                       cwd=ROOT, check=True, stdout=sys.stderr)
    run(args.duration, [int(c) for c in args.counts.split(",")])


if __name__ == "__main__":
    main()
