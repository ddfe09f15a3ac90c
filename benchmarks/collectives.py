"""The latency of gloo's collectives between two processes on this machine, one thread each, at a decode step's
sizes: the all-reduce of [tokens, hidden] fp32 partial sums (gloo's own, and an all-gather summed in rank order),
and the broadcast of a step's inputs (a length then the bytes, or one fixed-size buffer). Each op runs after a
short busy loop (--work-ms), as in a step, where a rank arrives at a collective from its kernels; the figure is
the median over --iters of each rank's time in the op: the rank that arrives last waits only for the transfer
(its time is the op's latency), the one that arrives first waits for the other as well.

    python benchmarks/collectives.py --tokens 1,8 --bind
"""
import argparse
import datetime
import os
import random
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def busy(ms: float):
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def group(rank: int, store, threads: int):
    opts = dist.ProcessGroupGloo._Options()
    opts._threads, opts._timeout = threads, datetime.timedelta(seconds=60)
    opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(dist.PrefixStore(f"t{threads}", store), rank, 2, opts)


def ops(pg, x: torch.Tensor) -> dict:
    """name -> a function making one collective on x (or a buffer of the same bytes)."""
    parts = [torch.empty_like(x) for _ in range(2)]
    bopts = dist.BroadcastOptions()
    bopts.rootRank = 0
    size, buf = torch.zeros(1, dtype=torch.long), torch.zeros(x.numel() * 4, dtype=torch.uint8)

    def gathered():
        pg.allgather([parts], [x]).wait()
        torch.add(parts[0], parts[1], out=x)

    def two_broadcasts():
        pg.broadcast([size], bopts).wait()
        pg.broadcast([buf], bopts).wait()
    def spun(work):
        while not work.is_completed():
            pass
        work.wait()
    return {"all_reduce": lambda: pg.allreduce([x]).wait(), "all_reduce, spinning": lambda: spun(pg.allreduce([x])),
            "all_gather + sum": gathered,
            "broadcast x2 (length, bytes)": two_broadcasts,
            "broadcast x1 (fixed buffer)": lambda: pg.broadcast([buf], bopts).wait()}


def worker(rank: int, port: int, args, out):
    if args.bind:  # each rank on its own core, as the engine binds them (bind_cores)
        os.sched_setaffinity(0, [sorted(os.sched_getaffinity(0))[rank]])
    torch.set_num_threads(1)
    results = {}
    weights = torch.randn(args.stream_mib * 2 ** 18 // 2048, 2048) if args.stream_mib else None
    vec = torch.randn(2048)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    for threads in args.gloo_threads:
        pg = group(rank, store, threads)
        for tokens in args.tokens:
            x = torch.ones(tokens, args.hidden)
            for name, op in ops(pg, x).items():
                times = []
                for _ in range(args.iters):
                    if weights is not None:
                        torch.mv(weights, vec)  # a kernel's memory traffic (caches and TLB cold after it)
                    busy(args.work_ms + rank * args.skew_ms * random.random())
                    start = time.perf_counter()
                    op()
                    times.append(time.perf_counter() - start)
                results[(threads, tokens, name)] = times
        pg.shutdown()
    out.put((rank, results))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--work-ms", type=float, default=2.0)
    ap.add_argument("--gloo-threads", default="2,1", help="ProcessGroupGloo worker threads to try")
    ap.add_argument("--bind", action="store_true", help="each rank bound to a core of its own")
    ap.add_argument("--stream-mib", type=int, default=0, help="before each op, also read this many MiB (torch.mv)")
    ap.add_argument("--skew-ms", type=float, default=0.0, help="rank 1 arrives up to this much later (uniform)")
    a = ap.parse_args()
    a.tokens, a.gloo_threads = [int(t) for t in a.tokens.split(",")], [int(t) for t in a.gloo_threads.split(",")]
    port = 29000 + int(time.time()) % 1000
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, a, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    print("| gloo threads | tokens | op | median ms, the rank that came last | median ms, the rank that came first |\n"
          "|---:|---:|---|---:|---:|")
    for key in results[0]:
        pairs = list(zip(results[0][key], results[1][key]))
        last, first = (1e3 * statistics.median(f(p) for p in pairs) for f in (min, max))
        print(f"| {key[0]} | {key[1]} | {key[2]} | {last:.3f} | {first:.3f} |")


if __name__ == "__main__":
    main()
