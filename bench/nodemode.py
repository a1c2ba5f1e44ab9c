#!/usr/bin/env python3
"""Node mode versus sidecars: N workloads on one host, each in its own network
namespace, served either by ONE node agent (mode: node, workloads enrolled
while it runs with `weft-agent workload enroll`) or by N sidecar agents (one
per namespace, capture installed by `weft-agent redirect install`, agent run
as uid 1337). The same traffic in both modes: workload k calls workload
(k+1) mod N by its service's virtual IP, on an HTTP port (declared `http`),
at a fixed rate, open loop, with `weft-loadgen http` (one per workload, in
its namespace, keep-alive connections, latency from each request's due time).

Measured per mode and N, over the load window (after a warm-up):
  - total RSS of the agents at the end of the load (sum of VmRSS) and the
    sum of their peaks (VmHWM), plus the RSS when idle before the load; the
    sum of PSS (shared pages such as the binary's text split between the
    agents that map them) and of anonymous / mapped (file, shmem) RSS;
  - CPU seconds the agents used during the load (utime + stime deltas);
  - latency p50 / p99 / max merged over every request of every generator,
    and errors (a run with errors is not a valid result: the script says so
    and exits non-zero);
  - the zone controller's RSS, for context.

Topology (all inside namespaces this script creates and deletes at exit):

    netns wnb-host: weft-zone (API 127.0.0.1:5681, gRPC 0.0.0.0:5678),
                    the node agent (node mode), ip_forward on
       | veth 10.212.<k+1>.1  <->  10.212.<k+1>.2 netns wnb-w<k>:
                                   nginx :8081, weft-loadgen http,
                                   the sidecar agent (sidecar mode)

    sudo bench/nodemode.py [--counts 1,10,25,50] [--rate 50] [--duration 15]
                           [--modes node,sidecar] [--no-build]

Needs root (namespaces, nftables, setns), nginx (nginx-light), nft, curl,
and release binaries weft-agent, weft-zone, weft-loadgen (built unless
--no-build; $CARGO_TARGET_DIR is honoured). Prints a markdown table and
writes the chart docs/node-mode-memory.svg (memory against N, both modes).
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from controlplane import http  # noqa: E402

# The node agent's worker_threads (--node-threads) and nice value
# (--node-nice).
NODE_THREADS = 1
NODE_NICE = 0
# The node agent's cpu.shares (--node-cpu-shares; 0: none of its own).
NODE_CPU_SHARES = 0
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
HOST_NS = "wnb-host"
PREFIX = "wnb-"
API = "127.0.0.1:5681"
GRPC_PORT = 5678
APP_PORT = 8081
AGENT_UID = 1337
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLONE_NEWNET = 0x40000000
# Targets of the issue.
NODE_TARGET_MIB = 40
SIDECAR_TARGET_MIB_EACH = 12


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kw)


def wait(what, probe, deadline=120.0, every=0.1):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        got = probe()
        if got:
            return got
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


def proc_status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def pss_kib(pid):
    """Proportional set size: shared pages (the binary's text, libc) split
    between the processes that map them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15; fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


CGROUP = "/sys/fs/cgroup/cpu/weft-node-bench"


def give_cpu_shares(pid, shares):
    """Puts the node agent in a cpu cgroup (v1) of its own with `shares`
    (1024 is one process's): the CPU entitlement a system service gets
    from systemd's CPUWeight= or a DaemonSet from its requests, instead of
    one process's share among the workloads' hundred."""
    os.makedirs(CGROUP, exist_ok=True)
    with open(os.path.join(CGROUP, "cpu.shares"), "w") as f:
        f.write(str(shares))
    with open(os.path.join(CGROUP, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def remove_cgroup():
    if os.path.isdir(CGROUP):
        try:
            os.rmdir(CGROUP)
        except OSError:
            pass


def runq_wait_seconds(pid):
    """Time the agent's main thread (its runtime's, with one worker) spent
    runnable but waiting for a CPU, from /proc/<pid>/schedstat."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def enter_netns(name):
    """Moves this (single-threaded) process into netns `name`: its sockets and
    its children live there from now on."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


# The namespace the script started in, to come back to.
ORIGINAL_NETNS = os.open("/proc/self/ns/net", os.O_RDONLY)


def leave_netns():
    if ctypes.CDLL(None, use_errno=True).setns(ORIGINAL_NETNS, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns back")


def delete_namespaces():
    for line in sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", name, check=False)


def wns(k):
    return f"{PREFIX}w{k}"


def wip(k):
    return f"10.212.{k + 1}.2"


def service(k):
    return f"s{k}"


def workload_name(k):
    return f"s{k}-w"


def build_topology(n):
    sh("ip", "netns", "add", HOST_NS)
    sh("ip", "-n", HOST_NS, "link", "set", "lo", "up")
    sh("ip", "netns", "exec", HOST_NS, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    for k in range(n):
        ns = wns(k)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", HOST_NS, "link", "add", f"vh{k}", "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        sh("ip", "-n", HOST_NS, "addr", "add", f"10.212.{k + 1}.1/24", "dev", f"vh{k}")
        sh("ip", "-n", HOST_NS, "link", "set", f"vh{k}", "up")
        sh("ip", "-n", ns, "addr", "add", f"{wip(k)}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"10.212.{k + 1}.1")


class Run:
    """One mode at one N: topology, zone, apps, agents; stop() undoes it all."""

    def __init__(self, mode, n, work):
        self.mode, self.n, self.work = mode, n, work
        self.procs = []
        self.agents = []

    def spawn(self, name, args, uid=None, env=None):
        log = open(os.path.join(self.work, f"{name}.log"), "w")
        env = {k: v for k, v in (env or os.environ).items() if not k.startswith("WEFT_")}
        p = subprocess.Popen(args, stdout=log, stderr=log, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def start_zone(self):
        log = open(os.path.join(self.work, "zone.log"), "w")
        self.zone = subprocess.Popen(
            [os.path.join(BIN, "weft-zone"), "run", "--store", f"sqlite://{self.work}/zone.db",
             "--listen", API, "--grpc-listen", f"0.0.0.0:{GRPC_PORT}", "--zone", "default"],
            stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "warn"},
            start_new_session=True)
        self.procs.append(self.zone)
        wait("the zone's API", lambda: http("GET", f"http://{API}/v1/zone")[0] == 200, 30)
        status, body = http("PUT", f"http://{API}/v1/resources",
                            "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: default\n"
                            "spec:\n  trustDomain: bench.weft\n", "application/yaml")
        if status not in (200, 201):
            raise SystemExit(f"applying the mesh: {status} {body!r}")

    def token(self, names, label):
        status, body = http("POST", f"http://{API}/v1/tokens", json.dumps(
            {"mesh": "default", "workloads": {"names": names}, "ttl": "10m", "maxUses": 1}))
        if status not in (200, 201):
            raise SystemExit(f"token: {status} {body!r}")
        t = json.loads(body)
        path = os.path.join(self.work, f"{label}.token")
        with open(path, "w") as f:
            f.write(t["secret"])
        return t["caPin"], path

    def start_apps(self):
        for k in range(self.n):
            conf = os.path.join(self.work, f"nginx-{k}.conf")
            tmp = os.path.join(self.work, f"nginx-{k}")
            os.makedirs(tmp, exist_ok=True)
            with open(conf, "w") as f:
                f.write(f"""daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    server {{
        listen {APP_PORT};
        location / {{ default_type text/plain; return 200 "hello from {service(k)}\\n"; }}
    }}
}}
""")
            self.spawn(f"nginx-{k}", ["ip", "netns", "exec", wns(k), "nginx", "-c", conf,
                                      "-p", tmp, "-e", f"{tmp}/error.log"])

    def base_config(self):
        return {
            "inbound": {"listen": "0.0.0.0:15008", "mtls": "strict",
                        "plaintext_listen": "0.0.0.0:15006"},
            "outbound": {"capture_listen": "127.0.0.1:15001"},
            "admin": {"listen": "127.0.0.1:15000"},
            "metrics": {"listen": "0.0.0.0:15020"},
            "log": {"level": os.environ.get("BENCH_AGENT_LOG", "warn")},
        }

    def write_config(self, name, config):
        path = os.path.join(self.work, f"{name}.yaml")
        with open(path, "w") as f:
            json.dump(config, f)
        return path

    def start_node(self):
        names = [workload_name(k) for k in range(self.n)]
        pin, token_file = self.token(names, "node")
        config = self.base_config()
        config.update({
            "mode": "node",
            "controller": {"address": f"127.0.0.1:{GRPC_PORT}", "ca_pin": pin,
                           "token_file": token_file,
                           "state_dir": os.path.join(self.work, "node-state"),
                           "agent_name": "node"},
            # Names outside the mesh go to the host, where nothing answers.
            "dns": {"enabled": True, "listen": "127.0.0.1:15053", "upstream": ["10.212.1.1:53"]},
            "redirect": {"exclude_ports": [22], "inbound": True, "dns": True},
            "worker_threads": NODE_THREADS,
        })
        path = self.write_config("node", config)
        # --node-nice: the CPU weight a node agent gets as a system
        # service (systemd CPUWeight=/Nice=) instead of one process's share.
        nice = ["nice", "-n", str(NODE_NICE)] if NODE_NICE else []
        agent = self.spawn("node-agent", nice + [os.path.join(BIN, "weft-agent"), "run", "-c", path])
        self.agents.append(agent)
        if NODE_CPU_SHARES:
            give_cpu_shares(agent.pid, NODE_CPU_SHARES)
        def ready():
            if agent.poll() is not None:
                raise SystemExit(f"the node agent exited; see {self.work}/node-agent.log")
            return http("GET", "http://127.0.0.1:15000/ready")[0] == 200
        wait("the node agent's /ready", ready, 30)
        for k in range(self.n):
            out = sh(os.path.join(BIN, "weft-agent"), "workload", "enroll", "--name",
                     workload_name(k), "--service", service(k), "--service-account", service(k),
                     "--address", wip(k), "--netns", f"/run/netns/{wns(k)}",
                     "--port", f"{APP_PORT}/http", check=False,
                     env={k: v for k, v in os.environ.items() if not k.startswith("WEFT_")})
            if out.returncode != 0:
                raise SystemExit(f"enrolling {workload_name(k)}: {out.stdout}{out.stderr}")

    def start_sidecars(self):
        for k in range(self.n):
            name = workload_name(k)
            pin, token_file = self.token([name], name)
            state = os.path.join(self.work, f"{name}-state")
            os.makedirs(state, exist_ok=True)
            config = self.base_config()
            config.update({
                "controller": {"address": f"10.212.{k + 1}.1:{GRPC_PORT}", "ca_pin": pin,
                               "token_file": token_file, "state_dir": state, "agent_name": name},
                "workload": {"name": name, "namespace": "default", "service": service(k),
                             "service_account": service(k), "address": wip(k),
                             "ports": [{"port": APP_PORT, "protocol": "http"}]},
                "dns": {"enabled": True, "listen": "127.0.0.1:15053",
                        "upstream": [f"10.212.{k + 1}.1:53"]},
                "redirect": {"agent_uid": AGENT_UID, "exclude_ports": [22], "inbound": True,
                             "dns": True},
            })
            path = self.write_config(name, config)
            for p in (token_file, state, path):
                os.chown(p, AGENT_UID, AGENT_UID)
            out = sh("ip", "netns", "exec", wns(k), os.path.join(BIN, "weft-agent"), "redirect",
                     "install", "-c", path, check=False)
            if out.returncode != 0:
                raise SystemExit(f"redirect install in {wns(k)}: {out.stdout}{out.stderr}")
            self.agents.append(self.spawn(f"{name}-agent", [
                "ip", "netns", "exec", wns(k), "setpriv", f"--reuid={AGENT_UID}",
                f"--regid={AGENT_UID}", "--clear-groups", os.path.join(BIN, "weft-agent"), "run",
                "-c", path]))

    def wait_converged(self):
        def probe():
            for a in self.agents:
                if a.poll() is not None:
                    raise SystemExit(f"an agent exited ({a.args}); logs in {self.work}")
            status, body = http("GET", f"http://{API}/v1/inspect/agents")
            if status != 200:
                return None
            listed = json.loads(body)
            want = 1 if self.mode == "node" else self.n
            ok = [a for a in listed
                  if a.get("online") and a.get("appliedVersion") and not a.get("lastNack")]
            return len(ok) >= want
        wait("every agent online with its config applied", probe, 120)
        status, body = http("GET", f"http://{API}/v1/inspect/services")
        services = json.loads(body)
        vips = {s["name"]: s.get("virtualIp") for s in services}
        missing = [service(k) for k in range(self.n) if not vips.get(service(k))]
        if missing:
            raise SystemExit(f"no virtual IP for {missing}: {services}")
        self.vips = vips

    def url(self, k):
        return f"http://{self.vips[service((k + 1) % self.n)]}:{APP_PORT}/"

    def wait_paths(self):
        """Every workload reaches its target through the mesh (curl, as root
        in its namespace: captured like the load generator)."""
        pending = set(range(self.n))

        def probe():
            for k in sorted(pending):
                out = sh("ip", "netns", "exec", wns(k), "curl", "-s", "--max-time", "3",
                         self.url(k), check=False)
                if f"hello from {service((k + 1) % self.n)}" in out.stdout:
                    pending.discard(k)
            return not pending
        wait(f"every workload to reach the next one through the mesh ({self.mode})", probe, 90,
             0.5)

    def load(self, rate, duration, connections, samples):
        gens = []
        for k in range(self.n):
            args = ["ip", "netns", "exec", wns(k), os.path.join(BIN, "weft-loadgen"), "http",
                    "--url", self.url(k), "--rate", str(rate), "--duration", f"{duration}s",
                    "--connections", str(connections)]
            if samples:
                args.append("--samples")
            gens.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, start_new_session=True))
        results = []
        for g in gens:
            out, err = g.communicate(timeout=duration + 60)
            if g.returncode != 0:
                raise SystemExit(f"weft-loadgen http failed: {err}")
            results.append(json.loads(out))
        return results

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def measure(mode, n, args):
    work = tempfile.mkdtemp(prefix=f"weft-node-bench-{mode}-{n}-")
    os.chmod(work, 0o755)
    run = Run(mode, n, work)
    try:
        build_topology(n)
        enter_netns(HOST_NS)
        run.start_zone()
        run.start_apps()
        if mode == "node":
            run.start_node()
        else:
            run.start_sidecars()
        run.wait_converged()
        run.wait_paths()
        warm = run.load(args.rate, args.warmup, args.connections, False)
        warm_errors = sum(r["errors"] for r in warm)
        pids = [a.pid for a in run.agents]
        for pid in pids:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "weft-agent":
                    raise SystemExit(f"pid {pid} is not the agent")
        idle = sum(proc_status(p, "VmRSS") for p in pids)
        cpu0 = sum(cpu_seconds(p) for p in pids)
        waits0 = [runq_wait_seconds(p) for p in pids]
        t0 = time.monotonic()
        results = run.load(args.rate, args.duration, args.connections, True)
        wall = time.monotonic() - t0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        waits = [runq_wait_seconds(p) - w for p, w in zip(pids, waits0)]
        rss = sum(proc_status(p, "VmRSS") for p in pids)
        hwm = sum(proc_status(p, "VmHWM") for p in pids)
        pss = sum(pss_kib(p) for p in pids)
        anon = sum(proc_status(p, "RssAnon") for p in pids)
        # File-backed and shmem (the binary on a tmpfs counts as shmem).
        mapped = sum(proc_status(p, "RssFile") + proc_status(p, "RssShmem") for p in pids)
        zone_rss = proc_status(run.zone.pid, "VmRSS")
        samples = sorted(s for r in results for s in r["samples_us"])
        errors = sum(r["errors"] for r in results)
        scheduled = sum(r["scheduled"] for r in results)

        def pct(q):
            i = min(len(samples), max(1, int(-(-len(samples) * q // 1)))) - 1
            return samples[i] / 1000.0 if samples else float("nan")
        first_error = next((r["first_error"] for r in results if r["first_error"]), None)
        return {
            "mode": mode, "n": n, "agents": len(pids), "rate_total": args.rate * n,
            "requests": len(samples), "scheduled": scheduled, "errors": errors,
            "warmup_errors": warm_errors, "first_error": first_error,
            "rss_mib": rss / 1024, "hwm_mib": hwm / 1024, "idle_mib": idle / 1024,
            "pss_mib": pss / 1024, "anon_mib": anon / 1024, "mapped_mib": mapped / 1024,
            "cpu_s": cpu, "cpu_pct": 100 * cpu / wall, "p50": pct(0.5), "p99": pct(0.99),
            "max": pct(1.0), "zone_mib": zone_rss / 1024,
            "runq_wait_s": sum(waits), "runq_wait_max_s": max(waits),
        }
    finally:
        run.stop()
        leave_netns()
        delete_namespaces()
        if args.keep:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def svg_chart(rows, path):
    """Total agent RSS (MiB) against N, one line per mode (and the sidecars'
    PSS, dotted: their shared pages counted once), the targets dashed."""
    w, h, left, right, top, bottom = 680, 400, 70, 210, 30, 50
    pw, ph = w - left - right, h - top - bottom
    ns = sorted({r["n"] for r in rows})
    xmax = max(ns)
    ymax = max([r["rss_mib"] for r in rows] + [SIDECAR_TARGET_MIB_EACH * xmax, NODE_TARGET_MIB])
    step = next(s for s in (10, 20, 50, 100, 200, 500, 1000) if ymax / s <= 8)
    ymax = step * (int(ymax // step) + 1)

    def x(n):
        return left + pw * n / xmax

    def y(v):
        return top + ph * (1 - v / ymax)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left + pw / 2}" y="18" text-anchor="middle" font-size="14">'
           f'Total agent RSS against workloads per host</text>']
    for v in range(0, int(ymax) + 1, step):
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + pw}" y2="{y(v):.1f}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>')
    for n in ns:
        out.append(f'<text x="{x(n):.1f}" y="{top + ph + 18}" text-anchor="middle">{n}</text>')
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" '
               f'stroke="black"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 10}" text-anchor="middle">'
               f'N (workloads on the host)</text>')
    out.append(f'<text transform="translate(18 {top + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">total agent RSS (MiB)</text>')
    colours = {"node": "#1f77b4", "sidecar": "#d62728"}
    # Targets: node agent under 40 MiB (flat); sidecars under 12 MiB each.
    out.append(f'<line x1="{x(0):.1f}" y1="{y(NODE_TARGET_MIB):.1f}" x2="{x(xmax):.1f}" '
               f'y2="{y(NODE_TARGET_MIB):.1f}" stroke="{colours["node"]}" '
               f'stroke-dasharray="6 4"/>')
    out.append(f'<line x1="{x(0):.1f}" y1="{y(0):.1f}" x2="{x(xmax):.1f}" '
               f'y2="{y(SIDECAR_TARGET_MIB_EACH * xmax):.1f}" stroke="{colours["sidecar"]}" '
               f'stroke-dasharray="6 4"/>')
    series = [("node", "rss_mib", "", 2), ("sidecar", "rss_mib", "", 2),
              ("sidecar", "pss_mib", "2 3", 1.5)]
    for mode, key, dash, width in series:
        pts = sorted((r["n"], r[key]) for r in rows if r["mode"] == mode and key in r)
        if not pts:
            continue
        line = " ".join(f"{x(n):.1f},{y(v):.1f}" for n, v in pts)
        out.append(f'<polyline points="{line}" fill="none" stroke="{colours[mode]}" '
                   f'stroke-width="{width}" stroke-dasharray="{dash or "none"}"/>')
        for n, v in pts:
            out.append(f'<circle cx="{x(n):.1f}" cy="{y(v):.1f}" r="3" '
                       f'fill="{colours[mode]}"/>')
            # Node mode's labels right of its points, the sidecars' left
            # (none at the smallest N, where both modes meet).
            if mode == "node":
                out.append(f'<text x="{x(n) + 5:.1f}" y="{y(v) - 5:.1f}" font-size="10" '
                           f'fill="{colours[mode]}">{v:.0f}</text>')
            elif n != ns[0]:
                out.append(f'<text x="{x(n) - 4:.1f}" y="{y(v) - 8:.1f}" text-anchor="end" '
                           f'font-size="10" fill="{colours[mode]}">{v:.0f}</text>')
    lx, ly = left + pw + 12, top + 10
    legend = [("node", "node mode (1 agent)", ""), ("sidecar", "sidecar mode (N agents)", ""),
              ("sidecar", "sidecar mode, PSS", "2 3"),
              ("node", f"target: node &lt; {NODE_TARGET_MIB} MiB", "6 4"),
              ("sidecar", f"target: sidecars &lt; N x {SIDECAR_TARGET_MIB_EACH} MiB", "6 4")]
    for i, (mode, label, dash) in enumerate(legend):
        yy = ly + 18 * i
        out.append(f'<line x1="{lx}" y1="{yy}" x2="{lx + 22}" y2="{yy}" stroke="{colours[mode]}" '
                   f'stroke-width="{1 if dash else 2}" stroke-dasharray="{dash or "none"}"/>')
        out.append(f'<text x="{lx + 28}" y="{yy + 4}" font-size="10">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1,10,25,50")
    parser.add_argument("--modes", default="node,sidecar")
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s per workload")
    parser.add_argument("--duration", type=int, default=15, help="seconds of measured load")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of load before it")
    parser.add_argument("--connections", type=int, default=2,
                        help="keep-alive connections per generator")
    parser.add_argument("--chart", default=os.path.join(ROOT, "docs", "node-mode-memory.svg"))
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--node-threads", type=int, default=1,
                        help="the node agent's worker_threads (sidecars keep their default, 1)")
    parser.add_argument("--node-cpu-shares", type=int, default=0,
                        help="put the node agent in a cpu cgroup with these shares (e.g. 51200: "
                             "the 50 sidecars' 50 x 1024)")
    parser.add_argument("--node-nice", type=int, default=0,
                        help="run the node agent under nice -n N (e.g. -10: a system service's CPU weight)")
    args = parser.parse_args()
    global NODE_THREADS, NODE_NICE, NODE_CPU_SHARES
    NODE_THREADS = args.node_threads
    NODE_NICE = args.node_nice
    NODE_CPU_SHARES = args.node_cpu_shares
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, nftables)")
    for tool in ("nginx", "nft", "curl", "setpriv", "ip"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "weft-zone", "-p", "weft-agent",
                        "-p", "weft-loadgen"], cwd=ROOT, check=True, stdout=sys.stderr)
    counts = [int(c) for c in args.counts.split(",")]
    if max(counts) > 250:
        raise SystemExit("at most 250 workloads (10.212.<k+1>.0/24 each)")
    delete_namespaces()
    print(f"# {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())} on {os.cpu_count()} cores; "
          f"{args.rate:g} req/s per workload (open loop, {args.connections} keep-alive "
          f"connections each), {args.duration} s measured after {args.warmup} s warm-up",
          flush=True)
    print("| mode | N | agents | req/s total | requests (errors) | agent RSS total, end of load "
          "| sum of agent peaks | idle RSS | PSS total | RSS anon / mapped "
          "| agent CPU s (% of a core) | p50 | p99 | max | zone RSS |")
    print("| --- " * 15 + "|", flush=True)
    rows = []
    invalid = False
    try:
        for n in counts:
            for mode in args.modes.split(","):
                r = measure(mode, n, args)
                rows.append(r)
                if r["errors"] or r["requests"] < r["scheduled"]:
                    invalid = True
                print(f"| {mode} | {n} | {r['agents']} | {r['rate_total']:g} "
                      f"| {r['requests']} ({r['errors']}) | {r['rss_mib']:.1f} MiB "
                      f"| {r['hwm_mib']:.1f} MiB | {r['idle_mib']:.1f} MiB "
                      f"| {r['pss_mib']:.1f} MiB "
                      f"| {r['anon_mib']:.1f} / {r['mapped_mib']:.1f} MiB "
                      f"| {r['cpu_s']:.2f} ({r['cpu_pct']:.0f}%) | {r['p50']:.2f} ms "
                      f"| {r['p99']:.2f} ms | {r['max']:.1f} ms | {r['zone_mib']:.1f} MiB |",
                      flush=True)
                print(f"<!-- {mode} N={n}: agents waited {r['runq_wait_s']:.2f} s in all for a CPU "
                      f"(the most-waiting one {r['runq_wait_max_s']:.2f} s) -->", flush=True)
                if r["errors"]:
                    print(f"<!-- {mode} N={n}: {r['errors']} errors, first: "
                          f"{r['first_error']} -->", flush=True)
    finally:
        delete_namespaces()
        remove_cgroup()
    if rows:
        svg_chart(rows, args.chart)
        print(f"\nchart: {os.path.relpath(args.chart, ROOT)}", file=sys.stderr)
        print(json.dumps(rows), file=sys.stderr)
    if invalid:
        raise SystemExit("some requests failed: those rows are not valid results")


if __name__ == "__main__":
    main()
