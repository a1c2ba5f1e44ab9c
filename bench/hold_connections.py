#!/usr/bin/env python3
"""Opens N concurrent connections through a tunnel, exchanges one message on
each, holds them all open, and reports the proxies' memory while they are
held. An echo server for the far end runs in this process.

  hold_connections.py --echo 127.0.0.1:18090 --via 127.0.0.1:19601 \
      --conns 1000 --pids 123,456
"""
import argparse
import asyncio
import sys


def mem_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


async def echo(reader, writer):
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--echo", required=True, help="where the echo server listens, host:port")
    ap.add_argument("--via", required=True, help="the tunnel's client-side listener, host:port")
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--pids", required=True, help="comma-separated proxy PIDs to measure")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    pids = [int(p) for p in args.pids.split(",") if p]
    eh, ep = args.echo.rsplit(":", 1)
    server = await asyncio.start_server(echo, eh, int(ep), backlog=4096)
    rss = lambda: sum(mem_kib(p, "VmRSS") for p in pids)
    hwm = lambda: sum(mem_kib(p, "VmHWM") for p in pids)
    idle_rss = rss()

    vh, vp = args.via.rsplit(":", 1)
    conns = []
    msg = b"x" * 64

    async def one(i):
        r, w = await asyncio.open_connection(vh, int(vp))
        w.write(msg)
        await w.drain()
        got = await r.readexactly(len(msg))
        assert got == msg, f"connection {i}: echo mismatch"
        conns.append((r, w))

    # Bounded: N connections, one message each, within the deadline.
    sem = asyncio.Semaphore(100)

    async def limited(i):
        async with sem:
            await one(i)

    await asyncio.wait_for(asyncio.gather(*(limited(i) for i in range(args.conns))), args.timeout)
    held_rss, held_hwm = rss(), hwm()
    # One more round trip on every held connection proves they are all live.
    async def again(rw):
        r, w = rw
        w.write(msg)
        await w.drain()
        await r.readexactly(len(msg))

    await asyncio.wait_for(asyncio.gather(*(again(c) for c in conns)), args.timeout)
    for _, w in conns:
        w.close()
    server.close()
    await asyncio.sleep(0)
    per = len(pids)
    print(f"conns={len(conns)} proxies={per} idle_rss_mib={idle_rss/1024:.1f} "
          f"held_rss_mib={held_rss/1024:.1f} peak_hwm_mib={held_hwm/1024:.1f} "
          f"per_proxy_held_mib={held_rss/1024/per:.1f} per_proxy_peak_mib={held_hwm/1024/per:.1f}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # a failed run must say why and exit non-zero
        print(f"hold_connections: {e!r}", file=sys.stderr)
        sys.exit(1)
