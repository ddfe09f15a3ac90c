"""Tensor and expert parallelism on one machine: TP=2 and EP=2 (one thread per rank) against one process with 2
threads, on the peer protocol's shapes (a 512-token prefill; 127 decode steps after a 128-token prompt at 1 and
8 streams; medians of --repeats after a warm-up), with each rank's resident memory after loading and the time
per decode step rank 0 spends in communication (its collectives and the step's message to the other ranks,
waits for a slower rank included).

    python benchmarks/parallel.py --model ../bench-run/models/v2lite-4L --dtype bfloat16 --eager

Every setting decodes through the fused decode layer where it can (one C call per layer in one process, two per
layer and rank under TP / EP); --eager adds TP=2 and EP=2 with the Python layers (enforce_eager). The ranks are
bound to their cores and get each step as one packed message (bind_cores, pack_step_messages: --options turns
them off to compare).

Each setting runs in a fresh process of its own, one after the other, so that their memory figures are apart.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every setting imports the dsinfer of this checkout, not an installed one
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
SETTINGS = {"1 process, 2 threads": dict(tensor_parallel_size=1, threads=2),
            "TP=2, 1 thread a rank": dict(tensor_parallel_size=2),
            "EP=2, 1 thread a rank": dict(tensor_parallel_size=2, enable_expert_parallel=True)}
EAGER = {"TP=2, Python layers": dict(tensor_parallel_size=2, enforce_eager=True),  # --eager: the ranks without
         "EP=2, Python layers": dict(tensor_parallel_size=2, enable_expert_parallel=True, enforce_eager=True)}


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def comm_seconds(llm) -> float:
    team = llm.engine.team
    return 0.0 if team is None else team.shard.comm_seconds


def fused_decode(llm) -> bool:
    """Whether decode steps go through the fused decode layer (one process's, or the ranks')."""
    engine = llm.engine
    return (engine.runner.fused if engine.team is None else engine.model.fused) is not None


def prefill_seconds(llm, params, tokens: int) -> float:
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": list(range(3, 3 + tokens))}], params(1), use_tqdm=False)
    return time.perf_counter() - start


def decode(llm, params, streams: int, steps: int) -> tuple[float, float]:
    """(decode tok/s, seconds in communication per step) over `steps` steps of `streams` 128-token prompts."""
    engine = llm.engine
    llm.add_requests([{"prompt_token_ids": [3 + (7 * s + i) % 500 for i in range(128)]} for s in range(streams)],
                     params(steps + 1))
    sched = engine.scheduler
    while sched.waiting or any(len(s) == s.num_prompt_tokens for s in sched.running):  # the prompts' prefills
        engine.step()
    start, comm = time.perf_counter(), comm_seconds(llm)
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return streams * steps / elapsed, (comm_seconds(llm) - comm) / steps


def one(model: str, dtype: str, repeats: int, prefill: int, setting: dict) -> dict:
    import torch

    from dsinfer import LLM, SamplingParams
    setting = dict(setting)
    torch.set_num_threads(setting.pop("threads", 1))
    start = time.perf_counter()
    llm = LLM(model, dtype=dtype, max_model_len=max(prefill + 1, 256 + 8), max_num_seqs=8, max_num_batched_tokens=512,
              enable_prefix_caching=False, **setting)
    loaded = time.perf_counter() - start
    team = llm.engine.team
    rss = [rss_mib()] + [rss_mib(p.pid) for p in (team.processes if team else [])]
    params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    out = {"load_s": loaded, "rss_mib": rss, "threads": torch.get_num_threads(), "fused_decode": fused_decode(llm),
           "dtype": str(llm.engine.model.model.norm.weight.dtype).removeprefix("torch.")}
    prefill_seconds(llm, params, prefill)
    out["prefill_tok_s"] = prefill / statistics.median(prefill_seconds(llm, params, prefill) for _ in range(repeats))
    for streams in (1, 8):
        decode(llm, params, streams, 8)  # warm-up
        runs = [decode(llm, params, streams, 127) for _ in range(repeats)]
        out[f"decode{streams}_tok_s"] = statistics.median(r[0] for r in runs)
        out[f"decode{streams}_comm_ms"] = 1e3 * statistics.median(r[1] for r in runs)
    llm.close()
    return out


def table(results: dict) -> str:
    base = results[next(iter(SETTINGS))]
    rows = ["| setting | fused decode | prefill (tok/s) | decode, 1 stream | decode, 8 streams | vs 1 process at 8 | "
            "communication per step, 1 / 8 streams (ms) | resident per rank after loading (MiB) | vs 1 process |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {name} | {'yes' if r['fused_decode'] else 'no'} | {r['prefill_tok_s']:.1f} | "
                    f"{r['decode1_tok_s']:.2f} | {r['decode8_tok_s']:.2f} | "
                    f"{r['decode8_tok_s'] / base['decode8_tok_s']:.2f}x | {r['decode1_comm_ms']:.2f} / "
                    f"{r['decode8_comm_ms']:.2f} | {' / '.join(f'{m:.0f}' for m in r['rss_mib'])} | "
                    f"{max(r['rss_mib']) / base['rss_mib'][0]:.2f}x |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill figure")
    ap.add_argument("--eager", action="store_true", help="also TP=2 and EP=2 with the Python layers (enforce_eager)")
    ap.add_argument("--only", choices=list(SETTINGS | EAGER), default=None, help=argparse.SUPPRESS)  # one, as JSON
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--options", default="{}", help="more LLM keyword arguments for the TP / EP settings, as JSON "
                    "(e.g. '{\"bind_cores\": false}' or '{\"pack_step_messages\": false}')")
    a = ap.parse_args()
    if a.only:
        setting = (SETTINGS | EAGER)[a.only]
        setting = setting | json.loads(a.options) if setting.get("tensor_parallel_size", 1) > 1 else setting
        print(json.dumps(one(a.model, a.dtype, a.repeats, a.prefill, setting)))
        return
    results = {}
    for name in list(SETTINGS) + (list(EAGER) if a.eager else []):
        cmd = [sys.executable, __file__, "--model", a.model, "--dtype", a.dtype, "--repeats", str(a.repeats),
               "--prefill", str(a.prefill), "--options", a.options, "--only", name]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=ENV)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
