"""RPC speed between two processes on loopback, beside a plain TCP socket measured in the same run.

    python benchmarks/bench_rpc.py [--sizes-mb 1 64 512] [--calls 2000] [--repeats 3] [--encryption on off]

Prints small-call round-trip latency and calls/s with 1 and 64 concurrent callers, and tensor
throughput (one way: the reply is empty) for each size, with the ratio to a raw socket ``sendall``,
for each encryption setting asked for (``on``: CurveZMQ, the default of every endpoint; ``off``: plain
ZeroMQ, what a simulation may choose), and the cost of encryption as the ratio between the two.
Goals: a 64 MB tensor at >= 50% of raw loopback throughput; small-call round trip < 0.5 ms (unencrypted).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import time

import torch

from hivesim.net import Endpoint

MB = 1 << 20


def serve_rpc(conn, encryption: bool) -> None:
    async def main() -> None:
        endpoint = await Endpoint(encryption=encryption).start()
        endpoint.register("ping", lambda payload, ctx: payload)
        endpoint.register("sink", lambda payload, ctx: None)
        conn.send(endpoint.address)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        await endpoint.close()

    asyncio.run(main())


def serve_raw(conn, sizes: list[int], repeats: int) -> None:
    """Receive each size ``repeats`` times into a reused buffer, then ``repeats`` times into a fresh one
    (what receiving a new tensor costs: its pages are faulted in as the bytes land); ack each with a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    peer, _ = listener.accept()
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reused = bytearray(max(sizes))
    for size in sizes:
        for attempt in range(2 * repeats):
            view = memoryview(reused if attempt < repeats else bytearray(size))
            got = 0
            while got < size:
                got += peer.recv_into(view[got:size], size - got)
            peer.sendall(b"k")
    peer.close()
    listener.close()


def raw_throughput(sizes: list[int], repeats: int) -> dict[tuple[str, int], float]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=serve_raw, args=(child, sizes, repeats))
    proc.start()
    port = parent.recv()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    result = {}
    payload = bytes(max(sizes))
    for size in sizes:
        for kind in ("reused", "fresh"):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                sock.sendall(memoryview(payload)[:size])
                sock.recv(1)
                times.append(time.perf_counter() - start)
            result[(kind, size)] = size / min(times)
    sock.close()
    proc.join(10)
    return result


async def rpc_measurements(address: str, sizes: list[int], calls: int, repeats: int, encryption: bool) -> dict:
    out: dict = {}
    async with Endpoint(encryption=encryption) as client:
        await client.call(address, "ping", 0)
        for concurrency in (1, 64):
            per_worker = max(1, calls // concurrency)
            latencies: list[float] = []

            async def worker() -> None:
                for i in range(per_worker):
                    t0 = time.perf_counter()
                    await client.call(address, "ping", i)
                    latencies.append(time.perf_counter() - t0)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
            out[("small", concurrency)] = (statistics.median(latencies), len(latencies) / elapsed)
        for size in sizes:
            tensor = torch.ones(size // 4)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                await client.call(address, "sink", tensor, timeout=600)
                times.append(time.perf_counter() - t0)
            out[("bulk", size)] = size / min(times)
            del tensor
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--calls", type=int, default=2000, help="small calls per concurrency level")
    parser.add_argument("--repeats", type=int, default=3, help="transfers per size (best is reported)")
    parser.add_argument("--encryption", nargs="+", choices=("on", "off"), default=["on", "off"],
                        help="settings to measure (default both, and their ratio)")
    args = parser.parse_args()
    sizes = [mb * MB for mb in args.sizes_mb]

    raw = raw_throughput(sizes, args.repeats)
    results = {setting: measure(setting == "on", sizes, args) for setting in args.encryption}

    print(f"hivesim RPC between two processes on loopback (torch {torch.__version__})")
    for setting, rpc in results.items():
        report(f"encryption {setting}", rpc, raw, sizes)
    if set(results) == {"on", "off"}:
        on, off = results["on"], results["off"]
        print()
        print("cost of encryption (on / off)")
        for concurrency in (1, 64):
            print(f"  small calls, {concurrency} concurrent: RTT x{on[('small', concurrency)][0] / off[('small', concurrency)][0]:.2f}, "
                  f"calls/s x{on[('small', concurrency)][1] / off[('small', concurrency)][1]:.2f}")
        for size in sizes:
            print(f"  {size // MB} MB tensor: throughput x{on[('bulk', size)] / off[('bulk', size)]:.2f}")


def measure(encryption: bool, sizes: list[int], args: argparse.Namespace) -> dict:
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(target=serve_rpc, args=(child, encryption))
    server.start()
    try:
        address = parent.recv()
        return asyncio.run(rpc_measurements(address, sizes, args.calls, args.repeats, encryption))
    finally:
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.kill()


def report(title: str, rpc: dict, raw: dict, sizes: list[int]) -> None:
    print()
    print(f"== {title}")
    print(f"{'small calls':<24}{'median RTT':>14}{'calls/s':>12}")
    for concurrency in (1, 64):
        rtt, rate = rpc[("small", concurrency)]
        print(f"{f'{concurrency} concurrent caller(s)':<24}{rtt * 1e3:>11.3f} ms{rate:>12.0f}")
    print()
    print("tensor throughput, one way (GB/s); raw = plain TCP sendall/recv_into in the same run,")
    print("into a reused buffer (the loopback limit) and into a fresh buffer (pages faulted in on arrival)")
    print(f"{'tensor':<10}{'hivesim':>9}{'raw reused':>12}{'ratio':>7}{'raw fresh':>11}{'ratio':>7}")
    for size in sizes:
        ours, warm, cold = rpc[("bulk", size)], raw[("reused", size)], raw[("fresh", size)]
        print(f"{size // MB:>6} MB{ours / 1e9:>9.2f}{warm / 1e9:>12.2f}{ours / warm:>7.2f}{cold / 1e9:>11.2f}{ours / cold:>7.2f}")
    rtt1 = rpc[("small", 1)][0]
    print()
    print(f"goal: small-call RTT < 0.5 ms -> {rtt1 * 1e3:.3f} ms ({'met' if rtt1 < 0.5e-3 else 'NOT met'})")
    if ("reused", 64 * MB) in raw and ("bulk", 64 * MB) in rpc:
        ratio = rpc[("bulk", 64 * MB)] / raw[("reused", 64 * MB)]
        print(f"goal: 64 MB at >= 50% of raw loopback -> {ratio:.0%} ({'met' if ratio >= 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
