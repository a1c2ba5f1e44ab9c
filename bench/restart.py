#!/usr/bin/env python3
"""How much a restart of an agent interrupts traffic, and how much a
handoff (SIGUSR2, what `systemctl reload weft-agent` sends) does.

Two agents in static mode on loopback carry traffic to an echo server:
  - a prober opens a new connection every 1000/--rate ms, sends a line and
    waits for its echo (timeout 5 s): each one either succeeds, with its
    latency, or fails (refused, reset, timed out);
  - --conns workers each hold one connection at a time, for a random
    1-4 s lifetime, sending a line every 50 ms and reading it back; a
    connection that errors before its lifetime ends is counted broken.
Each case starts fresh agents, lets the traffic run, then acts on one agent
(the caller's, "client", or the callee's, "server"):
  - restart:          SIGTERM, wait until it exits, start it again (what
                      `systemctl restart` does without a descriptor store);
  - restart-fdstore:  the same, but this script plays systemd's descriptor
                      store (FileDescriptorStoreMax=): it keeps the sockets
                      the agent stores (FDSTORE=1) and passes them to the
                      next process (LISTEN_FDS), as the packaged unit does;
  - reload:           SIGUSR2: the agent starts its binary again with its
                      sockets, and drains once the new process serves.
Reports per case: new connections failed, their latency p50/p99/max in the
window after the action, established connections broken, and how long the
old process took to exit.

  sudo python3 bench/restart.py [--bin target/release/weft-agent]
"""

import argparse
import array
import fcntl
import os
import random
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECHO_PORT = 18190
LISTEN_PORT = 19701
CLIENT_IP, SERVER_IP = "127.0.77.2", "127.0.77.3"


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            while data := self.request.recv(4096):
                self.request.sendall(data)
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


def certs(d):
    def run(*a):
        subprocess.run(a, check=True, cwd=d, capture_output=True)

    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=bench-ca")
    for who in ("client", "server"):
        run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}")
        with open(os.path.join(d, f"{who}.ext"), "w") as f:
            f.write(f"subjectAltName=URI:spiffe://bench.local/ns/default/sa/{who}\n")
        run("openssl", "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}.crt")


def configs(d, drain):
    common = f"drain_timeout: {drain}s\nlog: {{ level: info }}\n"
    with open(os.path.join(d, "server.yaml"), "w") as f:
        f.write(f"""identity: {{ cert: {d}/server.crt, key: {d}/server.key, trust_bundle: {d}/ca.crt }}
workload: {{ address: 127.0.0.1, ports: [ {{ port: {ECHO_PORT} }} ] }}
inbound: {{ listen: {SERVER_IP}:15008, plaintext_listen: {SERVER_IP}:15006, allow: [ "spiffe://bench.local/ns/default/sa/client" ] }}
outbound: {{ capture_listen: {SERVER_IP}:15001 }}
admin: {{ listen: {SERVER_IP}:15000 }}
metrics: {{ listen: {SERVER_IP}:15020 }}
{common}""")
    with open(os.path.join(d, "client.yaml"), "w") as f:
        f.write(f"""identity: {{ cert: {d}/client.crt, key: {d}/client.key, trust_bundle: {d}/ca.crt }}
workload: {{ address: {CLIENT_IP}, ports: [ {{ port: 1 }} ] }}
inbound: {{ listen: {CLIENT_IP}:15008, plaintext_listen: {CLIENT_IP}:15006 }}
outbound:
  capture_listen: {CLIENT_IP}:15001
  listeners: [ {{ listen: "127.0.0.1:{LISTEN_PORT}", target: "127.0.0.1:{ECHO_PORT}" }} ]
  endpoints: [ {{ address: 127.0.0.1, agent: "{SERVER_IP}:15008", identity: "spiffe://bench.local/ns/default/sa/server" }} ]
admin: {{ listen: {CLIENT_IP}:15000 }}
metrics: {{ listen: {CLIENT_IP}:15020 }}
{common}""")


class FdStore:
    """A stand-in for systemd's notify socket and descriptor store."""

    def __init__(self, d):
        self.path = os.path.join(d, f"notify-{time.monotonic_ns()}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.fds = {}  # name -> fd
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                msg, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except socket.timeout:
                continue
            fds = []
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(data[: len(data) - (len(data) % a.itemsize)])
                    fds.extend(a)
            fields = dict(l.split("=", 1) for l in msg.decode().splitlines() if "=" in l)
            if fields.get("FDSTORE") == "1" and fds:
                name = fields.get("FDNAME", "stored")
                old = self.fds.pop(name, None)
                if old is not None:
                    os.close(old)
                self.fds[name] = fds[0]
                for extra in fds[1:]:
                    os.close(extra)
            else:
                for fd in fds:
                    os.close(fd)

    def launch(self, cmd, log):
        """Starts `cmd` with the stored sockets at 3.., as systemd does."""
        names = list(self.fds)
        fds = [self.fds[n] for n in names]
        env = dict(os.environ, NOTIFY_SOCKET=self.path)
        if fds:
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))

        def place():
            # Copies above 3+n first, so no placement overwrites a socket
            # still to be placed.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i, inheritable=True)

        if fds:
            # LISTEN_PID must be the agent's own pid: set by a shell that
            # then becomes the agent.
            cmd = ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh"] + cmd
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, preexec_fn=place,
                                pass_fds=tuple(range(3, 3 + len(fds))) if fds else ())


def ready(ip, deadline=20.0):
    end = time.time() + deadline
    while time.time() < end:
        try:
            with socket.create_connection((ip, 15000), timeout=1) as s:
                s.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
                if b" 200 " in s.recv(100):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"agent on {ip} not ready")


class Traffic:
    def __init__(self, rate, conns):
        self.rate, self.conns = rate, conns
        self.stop = threading.Event()
        self.probes = []  # (t, latency or None, error)
        self.held = []  # (start, end, broken: bool, error)
        self.lock = threading.Lock()

    def probe_loop(self):
        every = 1.0 / self.rate
        nxt = time.time()
        while not self.stop.is_set():
            t = time.time()
            try:
                with socket.create_connection(("127.0.0.1", LISTEN_PORT), timeout=5) as s:
                    s.settimeout(5)
                    s.sendall(b"probe\n")
                    got = s.recv(64)
                    if not got:
                        raise OSError("closed without an answer")
                with self.lock:
                    self.probes.append((t, time.time() - t, None))
            except OSError as e:
                with self.lock:
                    self.probes.append((t, None, str(e)))
            nxt += every
            time.sleep(max(0.0, nxt - time.time()))

    def hold_loop(self, seed):
        rnd = random.Random(seed)
        while not self.stop.is_set():
            life = rnd.uniform(1.0, 4.0)
            start = time.time()
            err = None
            try:
                s = socket.create_connection(("127.0.0.1", LISTEN_PORT), timeout=5)
            except OSError:
                # Not established: the prober counts refusals.
                time.sleep(0.05)
                continue
            try:
                with s:
                    s.settimeout(5)
                    while time.time() - start < life:
                        s.sendall(b"x" * 64)
                        got = b""
                        while len(got) < 64:
                            part = s.recv(64 - len(got))
                            if not part:
                                raise OSError("closed by the proxy")
                            got += part
                        time.sleep(0.05)
            except OSError as e:
                err = str(e)
            with self.lock:
                self.held.append((start, time.time(), err is not None, err))
            if err is not None:
                time.sleep(0.05)

    def start(self):
        self.threads = [threading.Thread(target=self.probe_loop, daemon=True)]
        self.threads += [threading.Thread(target=self.hold_loop, args=(i,), daemon=True)
                         for i in range(self.conns)]
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))]


def run_case(args, d, side, how):
    store = FdStore(d) if how == "restart-fdstore" else None
    logs, procs = {}, {}

    def start(who):
        log = open(os.path.join(d, f"{who}-{how}.log"), "ab")
        cmd = [args.bin, "run", "-c", os.path.join(d, f"{who}.yaml")]
        if store is not None and who == side:
            p = store.launch(cmd, log)
        else:
            p = subprocess.Popen(cmd, stdout=log, stderr=log)
        procs[who] = p
        logs[who] = log.name
        return p

    for who in ("server", "client"):
        start(who)
        ready(SERVER_IP if who == "server" else CLIENT_IP)
    traffic = Traffic(args.rate, args.conns)
    traffic.start()
    time.sleep(args.before)
    old = procs[side]
    t0 = time.time()
    successor = None
    if how == "reload":
        old.send_signal(signal.SIGUSR2)
    else:
        old.send_signal(signal.SIGTERM)
        old.wait(timeout=args.drain + 15)
        start(side)
    old.wait(timeout=args.drain + 15)
    exited = time.time() - t0
    if how == "reload":
        with open(logs[side], "rb") as f:
            for line in f.read().decode(errors="replace").splitlines():
                if "the new agent process serves" in line and "pid=" in line:
                    successor = int(line.split("pid=")[1].split()[0])
    time.sleep(args.after)
    traffic.finish()
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    if successor:
        os.kill(successor, signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(timeout=args.drain + 15)
        except subprocess.TimeoutExpired:
            p.kill()
    if successor:
        for _ in range(200):
            try:
                os.kill(successor, 0)
                time.sleep(0.05)
            except ProcessLookupError:
                break
    if store:
        # As systemd does when a unit stops: the stored sockets close.
        store.stop = True
        store.thread.join()
        store.sock.close()
        os.unlink(store.path)
        for fd in store.fds.values():
            os.close(fd)
        store.fds.clear()
    window = [p for p in traffic.probes if p[0] >= t0 - 0.001]
    failed = [p for p in window if p[1] is None]
    if window and len(failed) == len(window):
        with open(logs[side], "rb") as f:
            print(f.read().decode(errors="replace")[-3000:], file=sys.stderr)
    lat = [p[1] * 1000 for p in window if p[1] is not None]
    in_flight = [h for h in traffic.held if h[0] < t0 < h[1] or (h[0] < t0 and h[2])]
    # Established before the action and broken after it; connections
    # opened later that fail are new connections, which the prober counts.
    broken = [h for h in traffic.held if h[2] and h[0] < t0]
    return {
        "case": f"{side} {how}",
        "probes": len(window),
        "failed": len(failed),
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "max": max(lat) if lat else float("nan"),
        "held": len(in_flight),
        "broken": len(broken),
        "exit_s": exited,
        "errors": sorted({p[2] for p in failed} | {h[3] for h in broken}),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                  "release", "weft-agent"))
    ap.add_argument("--rate", type=int, default=100, help="new connections per second")
    ap.add_argument("--conns", type=int, default=20, help="established connections held at a time")
    ap.add_argument("--drain", type=int, default=30, help="the agents' drain_timeout, seconds")
    ap.add_argument("--before", type=float, default=3.0)
    ap.add_argument("--after", type=float, default=8.0)
    ap.add_argument("--cases", default="client:restart,client:restart-fdstore,client:reload,"
                                       "server:restart,server:restart-fdstore,server:reload")
    args = ap.parse_args()
    echo = EchoServer(("127.0.0.1", ECHO_PORT), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    rows = []
    with tempfile.TemporaryDirectory(prefix="weft-restart-") as d:
        certs(d)
        configs(d, args.drain)
        for case in args.cases.split(","):
            side, how = case.split(":")
            r = run_case(args, d, side, how)
            rows.append(r)
            print(f"{r['case']:24} new conns {r['probes']:5} failed {r['failed']:4}  "
                  f"latency p50 {r['p50']:6.2f} p99 {r['p99']:7.2f} max {r['max']:7.1f} ms  "
                  f"established {r['held']:3} broken {r['broken']:3}  old exited after {r['exit_s']:.2f} s"
                  + (f"  errors: {'; '.join(r['errors'])[:160]}" if r['errors'] else ""), flush=True)
    echo.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
