"""Where a tensor-parallel decode step's time goes, on every rank: a timeline of one setting's decode steps (rank
0's scheduling, preparing, sending, forward parts and sampling; every rank's receiving, C halves, collectives and
logits), from timers patched into this process and into the worker processes it spawns (spawn re-imports this
file, which installs the same timers there). perf_counter is one clock for every process on a machine, so the
ranks' events line up. Prints per-step means for each rank, and one process's step for comparison.

    python benchmarks/parallel_trace.py --model ../bench-run/models/v2lite-4L --streams 8
"""
import argparse
import atexit
import collections
import json
import os
import statistics
import time

TRACE_DIR = "DSINFER_BENCH_TRACE_DIR"  # where each process writes its events (set by the parent for its workers)
EVENTS: list = []


def timed(owner, attr: str, name: str):
    """Records (name, start, end) for every call of owner.attr."""
    fn = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append((name, start, time.perf_counter()))
    setattr(owner, attr, wrapper)


def install(dump_at_exit: bool):
    """Timers on the parts of a step, in this process."""
    from dsinfer.engine import llm_engine, model_runner, parallel_group, worker
    from dsinfer.layers import parallel
    from dsinfer.models import fused_decode, parallel_fused, parallel_model
    timed(llm_engine.LLMEngine, "step", "step")
    timed(llm_engine.LLMEngine, "postprocess", "sample+output")
    timed(model_runner.ModelRunner, "prepare", "prepare")
    timed(parallel_group.Team, "send", "send")
    timed(parallel_group.Team, "send_words", "send")
    timed(parallel_group.Channel, "recv", "recv")
    timed(parallel.Shard, "all_reduce", "all_reduce")
    timed(parallel.Shard, "gather_last", "gather logits")
    timed(parallel_fused, "run_attention", "attention half")
    timed(parallel_fused, "run_ffn", "ffn half")
    timed(parallel_model.ParallelDeepseekModel, "embed", "embed")
    timed(parallel_model.ParallelDeepseekForCausalLM, "forward", "forward")
    timed(parallel_model.DeepseekForCausalLM, "compute_logits", "lm head")
    timed(fused_decode, "run_layer", "fused layer")
    timed(fused_decode.FusedDecoder, "__call__", "forward")
    from dsinfer.engine import scheduler
    timed(scheduler.Scheduler, "schedule", "schedule")
    if dump_at_exit:
        atexit.register(dump)


def dump():
    folder = os.environ.get(TRACE_DIR)
    if folder:
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
            json.dump(EVENTS, f)


if __name__ == "__mp_main__":  # a worker process spawned by the engine
    install(dump_at_exit=True)


def summary(events: list, steps: list[tuple[float, float]]) -> dict:
    """Per-step mean milliseconds and counts of each event name within the steps' windows."""
    total, count = collections.defaultdict(float), collections.defaultdict(int)
    for name, start, end in events:
        if any(a <= start and end <= b for a, b in steps):
            total[name] += end - start
            count[name] += 1
    return {n: (1e3 * total[n] / len(steps), count[n] / len(steps)) for n in total}


def decode_steps(llm, streams: int, steps: int) -> list[tuple[float, float]]:
    from dsinfer import SamplingParams
    engine = llm.engine
    llm.add_requests([{"prompt_token_ids": [3 + (7 * s + i) % 500 for i in range(128)]} for s in range(streams)],
                     SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True))
    sched = engine.scheduler
    while sched.waiting or any(len(s) == s.num_prompt_tokens for s in sched.running):  # until all decode
        engine.step()
    windows = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        windows.append((start, time.perf_counter()))
    while engine.has_unfinished():
        engine.step()
    return windows


def run(a, setting: dict, folder: str) -> dict:
    """{streams: (mean ms a step, {rank: summary})} for each of a.streams."""
    import torch

    from dsinfer import LLM
    os.environ[TRACE_DIR] = folder
    torch.set_num_threads(setting.pop("threads", 1))
    llm = LLM(a.model, dtype=a.dtype, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=512,
              enable_prefix_caching=False, **setting)
    windows = {}
    for streams in map(int, a.streams.split(",")):
        decode_steps(llm, streams, 8)  # warm-up
        windows[streams] = decode_steps(llm, streams, a.steps)
    events = {"rank 0" if llm.engine.team else "1 process": list(EVENTS)}
    llm.close()
    time.sleep(0.5)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            events[f"rank {len(events)}"] = json.load(f)
    if a.events:
        with open(a.events, "w") as f:
            json.dump({"windows": windows, "events": events}, f)
    return {n: (1e3 * statistics.mean(b - a for a, b in w), {r: summary(ev, w) for r, ev in events.items()})
            for n, w in windows.items()}


def main():
    import tempfile
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--streams", default="8,1", help="comma-separated")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--setting", choices=["one", "tp", "ep"], default="tp")
    ap.add_argument("--options", default="{}", help="more LLM keyword arguments, as JSON")
    ap.add_argument("--events", default=None, help="also write every event and step window here (JSON)")
    a = ap.parse_args()
    install(dump_at_exit=False)
    setting = {"one": dict(threads=2), "tp": dict(tensor_parallel_size=2),
               "ep": dict(tensor_parallel_size=2, enable_expert_parallel=True)}[a.setting] | json.loads(a.options)
    with tempfile.TemporaryDirectory() as folder:
        out = run(a, setting, folder)
    for streams, (step, ranks) in out.items():
        print(f"{a.setting} {a.options}, {streams} streams: {step:.2f} ms a step")
        for rank, parts in ranks.items():
            print(f"  {rank}: " + ", ".join(f"{n} {ms:.2f} ms x{c:.1f}" for n, (ms, c) in
                                            sorted(parts.items(), key=lambda p: -p[1][0])))

if __name__ == "__main__":
    main()
