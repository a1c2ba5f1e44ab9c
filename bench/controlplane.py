#!/usr/bin/env python3
"""Weft's control-plane benchmark: one zone controller (release build, embedded
store) and N real agents in controller mode on loopback addresses.

Measures, in one run:
  - enrolment: the time until all N agents are enrolled, online and have acked
    their first view;
  - propagation: the time from a resource change that alters every agent's
    view (a Workload that adds a port to a service all agents see) until every
    agent has acked the new view, as the controller's inventory records it
    (polled every 20 ms, so figures carry up to 20 ms of polling delay);
  - memory: the controller's and the agents' resident and peak memory.

    bench/controlplane.py [--agents 10,50,100] [--rounds 10]

No root needed; everything listens on 127.0.0.1 or 127.0.2.x and stops at exit.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
POLL = 0.02
DEADLINE = 120.0


def http(method, url, body=None, content_type="application/json"):
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()


def wait(what, probe, deadline=DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        got = probe()
        if got:
            return got
        time.sleep(POLL)
    raise SystemExit(f"timed out waiting for {what}")


def rss_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Zone:
    def __init__(self, work):
        self.work = work
        self.log = open(os.path.join(work, "zone.log"), "w")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "weft-zone"), "run", "--store", f"sqlite://{work}/zone.db",
             "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0", "--zone", "default"],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env={**os.environ, "RUST_LOG": "warn"})
        api = grpc = None
        while api is None or grpc is None:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit("weft-zone exited; see zone.log")
            if line.startswith("grpc listening on "):
                grpc = line.split()[-1]
            elif line.startswith("listening on "):
                api = line.split()[-1]
        self.api, self.grpc = f"http://{api}", grpc

    def apply(self, yaml):
        status, body = http("PUT", self.api + "/v1/resources", yaml, "application/yaml")
        if status not in (200, 201):
            raise SystemExit(f"apply failed: {status} {body!r}")

    def agents(self):
        status, body = http("GET", self.api + "/v1/inspect/agents")
        return json.loads(body) if status == 200 else []


def start_agent(zone, work, i, service):
    name = f"agent-{i}"
    ip = f"127.0.2.{i}"
    status, body = http("POST", zone.api + "/v1/tokens", json.dumps(
        {"mesh": "default", "workloads": {"names": [name]}, "ttl": "10m", "maxUses": 1}))
    if status not in (200, 201):
        raise SystemExit(f"token: {status} {body!r}")
    token = json.loads(body)
    token_file = os.path.join(work, f"{name}.token")
    with open(token_file, "w") as f:
        f.write(token["secret"])
    config = {
        "controller": {"address": zone.grpc, "ca_pin": token["caPin"], "token_file": token_file,
                       "state_dir": os.path.join(work, f"{name}-state"), "agent_name": name},
        "workload": {"name": name, "namespace": "default", "service": service,
                     "service_account": service, "address": ip,
                     "ports": [{"port": 8080, "protocol": "http"}]},
        "inbound": {"listen": f"{ip}:15008", "plaintext_listen": f"{ip}:15006"},
        "outbound": {"capture_listen": f"{ip}:15001"},
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


def run(n, rounds):
    work = tempfile.mkdtemp(prefix="weft-cp-bench-")
    procs = []
    try:
        zone = Zone(work)
        procs.append(zone.proc)
        zone.apply("apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: default\n"
                   "spec:\n  trustDomain: bench.weft\n")
        t0 = time.monotonic()
        agents = [start_agent(zone, work, i, f"svc-{i % 10}") for i in range(1, n + 1)]
        procs.extend(agents)

        def all_acked(previous=None):
            listed = zone.agents()
            if len(listed) < n:
                return None
            versions = {}
            for a in listed:
                v = a.get("appliedVersion") or ""
                if not a.get("online") or not v or a.get("lastNack"):
                    return None
                if previous is not None and previous.get(a["name"]) == v:
                    return None
                versions[a["name"]] = v
            return versions

        versions = wait(f"{n} agents enrolled and acked", all_acked)
        enrolled = time.monotonic() - t0

        delays = []
        for r in range(rounds):
            probe = (f"apiVersion: weft.io/v1alpha1\nkind: Workload\nmetadata:\n  name: probe-{r}\n"
                     f"  mesh: default\n  namespace: default\nspec:\n  address: 127.0.3.{r + 1}\n"
                     f"  service: svc-0\n  ports:\n  - port: {9000 + r}\n")
            start = time.monotonic()
            zone.apply(probe)
            versions = wait(f"round {r}: every agent acks the change", lambda: all_acked(versions))
            delays.append(time.monotonic() - start)
        zone_rss, zone_hwm = rss_kib(zone.proc.pid, "VmRSS"), rss_kib(zone.proc.pid, "VmHWM")
        agent_rss = [rss_kib(p.pid, "VmRSS") for p in agents]
        agent_hwm = [rss_kib(p.pid, "VmHWM") for p in agents]
        ms = sorted(d * 1000 for d in delays)
        print(f"| {n} | {enrolled:.2f} s | {statistics.median(ms):.0f} ms | {ms[-1]:.0f} ms "
              f"| {zone_rss / 1024:.1f} / {zone_hwm / 1024:.1f} MiB "
              f"| {statistics.median(agent_rss) / 1024:.1f} / {max(agent_hwm) / 1024:.1f} MiB |",
              flush=True)
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
    parser.add_argument("--agents", default="10,50,100")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "weft-zone", "-p", "weft-agent"],
                       cwd=ROOT, check=True, stdout=sys.stderr)
    counts = [int(c) for c in args.agents.split(",")]
    if max(counts) > 250:
        raise SystemExit("at most 250 agents (one loopback address each in 127.0.2.0/24)")
    print(f"# {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())} on {os.cpu_count()} cores, "
          f"{args.rounds} changes per size, inventory polled every {int(POLL * 1000)} ms")
    print("| agents | all enrolled and acked | change -> all acked p50 | max "
          "| zone RSS / peak | agent RSS median / peak max |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in counts:
        run(n, args.rounds)


if __name__ == "__main__":
    main()
