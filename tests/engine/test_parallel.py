"""Tensor and expert parallelism over 2 processes (gloo, CPU) against one process: the same greedy tokens and
prompt logprobs, batched with prefix caching and chunked prefill; a rank that dies or fails to start."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dsinfer import LLM, SamplingParams
from dsinfer.engine.parallel_group import ParallelError, spawn
from dsinfer.models.quant_plan import weight_tensors
from tests.conftest import random_prompts

PREFIX = random_prompts([40], seed=7)[0]
PROMPTS = [PREFIX + p for p in random_prompts([5, 23, 9], seed=1)] + random_prompts([17, 3], seed=2)
CORES = os.sched_getaffinity(0)  # at collection, before any engine here binds the main thread
PARAMS = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0)
ENGINE = dict(max_num_batched_tokens=32)  # prompts of 40+ tokens prefill in chunks; the prefix is cached


def results(llm, params=PARAMS) -> tuple[list, list]:
    """(greedy tokens, each prompt token's logprob) per prompt."""
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return ([o.outputs[0].token_ids for o in outs],
            [[lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])] if o.prompt_logprobs
             else [] for o in outs])


def assert_same(got, want):
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1]):
        assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tp(ckpts):
    llm = LLM(ckpts["v2-lite"], tensor_parallel_size=2, **ENGINE)
    yield llm
    llm.close()


def test_tensor_parallel_matches_one_process_with_prefix_hits(tp, llms):
    want = results(llms("v2-lite", **ENGINE))
    assert_same(results(tp), want)
    hits = tp.engine.stats().prefix_cache_hit_tokens
    greedy = SamplingParams(temperature=0, max_tokens=6)  # no prompt logprobs: prompts may come from the cache
    assert results(tp, greedy)[0] == want[0]
    assert tp.engine.stats().prefix_cache_hit_tokens > hits


@pytest.mark.parametrize("name,options", [
    ("v3", dict(enable_expert_parallel=True)),
    ("v3-fp8", dict()),
    ("v3", dict(quantization="int4")),
    ("v2-lite", dict(quantization="int4", enable_expert_parallel=True)),
], ids=["v3-ep", "v3-fp8-tp", "v3-int4-tp", "v2-lite-int4-ep"])
def test_split_models_match_one_process(ckpts, llms, name, options, monkeypatch):
    single = {k: v for k, v in options.items() if k != "enable_expert_parallel"}
    if "quantization" in options:
        # Quantized decode matmuls round activations to int8 per 32 inputs; a rank's slice of the tiny models'
        # 96 attention outputs is 48, so the blocks fall differently (real models' slices are multiples of 32).
        monkeypatch.setenv("DSINFER_INT8_ACTIVATIONS", "0")
        reference = LLM(ckpts[name], **ENGINE, **single)
    else:
        reference = llms(name, **ENGINE)
    with LLM(ckpts[name], tensor_parallel_size=2, **ENGINE, **options) as llm:
        assert_same(results(llm), results(reference))


def test_embeddings_match_one_process(tp, llms):
    prompt = {"prompt_token_ids": PROMPTS[0]}
    assert torch.allclose(tp.embed(prompt)[0], llms("v2-lite", **ENGINE).embed(prompt)[0], atol=1e-5)


def test_each_rank_holds_about_half_the_weights(tp, llms):
    size = lambda model: sum(t.numel() * t.element_size() for t in weight_tensors(model))
    assert size(tp.model.module) <= 0.6 * size(llms("v2-lite", **ENGINE).model)


def counting_sends(team, monkeypatch) -> list[str]:
    """The names of the Team's sends from now on: 'send' (a pickled object), 'send_words' (a packed step)."""
    sent = []
    for name in ("send", "send_words"):
        monkeypatch.setattr(team, name, lambda m, f=getattr(team, name), n=name: sent.append(n) or f(m))
    return sent


def test_each_step_is_one_packed_message(tp, llms, monkeypatch):
    sent = counting_sends(tp.engine.team, monkeypatch)
    assert_same(results(tp), results(llms("v2-lite", **ENGINE)))
    assert sent and set(sent) == {"send_words"}  # no logits messages, nothing pickled


def test_pickled_step_messages_match_one_process(ckpts, llms, monkeypatch):
    """pack_step_messages=False: the plain path, a pickled forward and a logits message per step."""
    with LLM(ckpts["v2-lite"], tensor_parallel_size=2, pack_step_messages=False, **ENGINE) as llm:
        sent = counting_sends(llm.engine.team, monkeypatch)
        got = results(llm)
    assert_same(got, results(llms("v2-lite", **ENGINE)))
    assert set(sent) == {"send"}


@pytest.mark.skipif(len(CORES) < 2, reason="binding needs a core for each rank")
@pytest.mark.parametrize("bind_cores", [True, False])
def test_ranks_on_their_own_cores_match_one_process_and_the_caller_gets_its_cores_back(ckpts, llms, bind_cores):
    """Rank 0 is the caller's thread: bound while the engine lives (so are the threads it starts), given its
    cores back on close. Run in a thread of its own, with every core, whatever the module's engine bound."""
    seen = {}

    def run():
        os.sched_setaffinity(0, CORES)
        with LLM(ckpts["v2-lite"], tensor_parallel_size=2, bind_cores=bind_cores, **ENGINE) as llm:
            seen["cores"] = [os.sched_getaffinity(0), os.sched_getaffinity(llm.engine.team.processes[0].pid)]
            seen["results"] = results(llm)
        seen["after"] = os.sched_getaffinity(0)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    mine, theirs = seen["cores"]
    if bind_cores:
        assert not mine & theirs and len(mine) == len(theirs) == len(CORES) // 2 and mine | theirs <= CORES
    else:
        assert mine == theirs == CORES
    assert seen["after"] == CORES
    assert_same(seen["results"], results(llms("v2-lite", **ENGINE)))


def test_sizes_that_do_not_split_are_refused_before_any_process_starts(ckpts):
    with pytest.raises(ValueError, match=r"is not divisible by tensor_parallel_size \(3\)"):
        LLM(ckpts["v2-lite"], tensor_parallel_size=3)


def exits_at_start(rank, size, port, messages, threads, cores):
    os._exit(3)


def test_a_rank_that_fails_to_start_is_an_error_not_a_hang():
    start = time.monotonic()
    with pytest.raises(ParallelError, match="rank 1 .* exited with code 3"):
        spawn(2, exits_at_start, (), torch.device("cpu"), False)
    assert time.monotonic() - start < 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_under_torchrun_match_one_process(ckpts, llms):
    """Two 'machines' on loopback: torchrun --nnodes 2, one rank each."""
    root, port = Path(__file__).parents[2], free_port()
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               str(root / "tests/engine/tp_generate.py"), str(ckpts["v2-lite"])],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    outs = [p.communicate(timeout=180) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    got = json.loads(outs[0][0].strip().splitlines()[-1])
    assert_same(got, results(llms("v2-lite", **ENGINE)))


def test_the_command_line_takes_the_parallel_options():
    from dsinfer.cli import load_options, parser
    args = parser().parse_args(["serve", "--tensor-parallel-size", "2", "--enable-expert-parallel"])
    options = load_options(args)
    assert options["tensor_parallel_size"] == 2 and options["enable_expert_parallel"] is True


def test_a_worker_that_dies_is_a_clear_error_and_no_hang(tp):
    """Last: it breaks the module's engine."""
    worker = tp.engine.team.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    start = time.monotonic()
    with pytest.raises(ParallelError, match=r"rank 1 \(pid \d+\) exited with code -9"):
        results(tp)
    assert time.monotonic() - start < 10
    with pytest.raises(ParallelError):  # and stays failed
        results(tp)


@pytest.mark.parametrize("option", [{"speculative_config": {"method": "mtp", "num_speculative_tokens": 1}},
                                    {"sparse_attention": {"sink": 16, "window": 64, "topk_blocks": 4}}])
def test_features_not_split_yet_are_refused_before_any_process_starts(option):
    from dsinfer.engine.config import EngineConfig
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 does not support"):
        EngineConfig.from_kwargs(tensor_parallel_size=2, **option)
