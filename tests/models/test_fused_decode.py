"""Decode batches through whole layers in one C call (models/fused_decode.py) against the Python layers, the
C struct layout check, and the switches that keep the Python layers."""
import ctypes
import os
import subprocess
import sys
import shutil
import statistics

import pytest
import torch

from dsinfer import LLM, SamplingParams, kernels
from dsinfer.kernels.decode_layer import LayerC, LayoutError, StepC, check_layout
from dsinfer.models.fused_decode import FusedDecoder, decode_slice
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the CPU kernels cannot be built on this machine")


@pytest.fixture
def fused_runs(monkeypatch):
    """The token counts of every fused decode step, whichever LLM ran it."""
    calls, call = [], FusedDecoder.__call__
    monkeypatch.setattr(FusedDecoder, "__call__", lambda self, ids, *a: calls.append(ids.shape[0]) or call(self, ids, *a))
    return calls


def generate(llm, prompts):
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)


def assert_same(results_a, results_b):
    for a, b in zip(results_a, results_b):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)


@pytest.mark.parametrize("name", ["v2-lite", "v2", "v3"])
def test_fused_layers_generate_what_the_python_layers_do(name, ckpts, fused_runs):
    prompts = random_prompts([5, 17, 40]) + random_prompts([300], seed=7)  # 300: several attention chunks
    results = []
    for eager in (False, True):
        llm = LLM(ckpts[name], enforce_eager=eager)
        results.append([generate(llm, prompts), generate(llm, prompts[-1:])])  # batched decodes, then one stream
    assert fused_runs and max(fused_runs) == len(prompts) and min(fused_runs) == 1  # the first LLM only
    for fused, plain in zip(*results):
        assert_same(fused, plain)


@pytest.mark.parametrize("options", [{}, {"quantization": "int8"}], ids=str)
def test_a_decode_of_9_to_16_sequences_is_one_fused_step(options, ckpts, fused_runs):
    """Up to step_tokens (16) decodes take the fused decoder in one call, with the Python layers' tokens; more
    take the Python layers (a plain engine does not chunk)."""
    prompts = random_prompts([3 + 2 * i for i in range(12)])
    results = [generate(LLM(ckpts["v3"], enforce_eager=eager, **options), prompts) for eager in (False, True)]
    assert 12 in fused_runs and max(fused_runs) == 12
    assert_same(*results)
    fused_runs.clear()
    generate(LLM(ckpts["v3"], **options), random_prompts([4] * 17))
    assert all(n <= 16 for n in fused_runs)  # 17 decodes: the Python layers


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "fp8"])
def test_fused_layers_write_and_read_compact_caches_as_the_python_layers_do(kv_dtype, ckpts, fused_runs):
    """The C layer stores bf16 (round to nearest even) and fp8 rows (layers/kv_format.py) as torch does."""
    prompts = random_prompts([5, 17, 40])
    results = []
    for eager in (False, True):
        llm = LLM(ckpts["v3"], enforce_eager=eager, kv_cache_dtype=kv_dtype)
        results.append(generate(llm, prompts))
        results.append([c.clone() for c in llm.engine.cache.layers])
    assert fused_runs and max(fused_runs) == len(prompts)
    assert_same(results[0], results[2])
    for fused, plain in zip(results[1], results[3]):
        assert torch.equal(fused, plain)  # the same bytes in every row


@pytest.mark.parametrize("name,options", [("v3", {"quantization": "int8"}), ("v2-lite", {"quantization": "int4"}),
                                          ("v3", {"quantization": "int4", "int8_activations": "0"}),
                                          ("v2", {"quantization": "int8", "kv_cache_dtype": "fp8"})])
def test_fused_layers_run_quantized_weights_as_the_python_layers_do(name, options, ckpts, fused_runs, monkeypatch):
    """int8 / int4 codes, with and without int8 activations: the same kernels as the Python layers' qgemv."""
    if "int8_activations" in options:
        monkeypatch.setenv("DSINFER_INT8_ACTIVATIONS", options.pop("int8_activations"))
    prompts = random_prompts([5, 17, 40])
    results = [generate(LLM(ckpts[name], enforce_eager=eager, **options), prompts) for eager in (False, True)]
    assert fused_runs and max(fused_runs) == len(prompts)
    assert_same(*results)


@pytest.mark.skipif(not {"avx512_vnni", "avx512vl"} <= kernels.cpu_flags(), reason="needs AVX512-VNNI")
def test_fused_layers_on_the_avx512_vnni_kernel_give_the_avx2_kernels_tokens(ckpts, fused_runs, monkeypatch):
    """A CPU with AVX512-VNNI but not AVX-VNNI takes the vnni512 copy (KernelConfig.int8_kernel 3) in the fused
    layer; its integer sums are the AVX2 kernel's, so the tokens and logprobs are the same."""
    from dsinfer.kernels import config
    prompts = random_prompts([5, 17, 40])
    monkeypatch.setattr(config, "cpu_flags", lambda: kernels.cpu_flags() - {"avx_vnni"})
    llm = LLM(ckpts["v3"], quantization="int8")
    assert llm.model.kernel_config.int8_kernel == 3
    vnni512 = generate(llm, prompts)
    monkeypatch.setenv("DSINFER_VNNI", "0")
    assert_same(vnni512, generate(LLM(ckpts["v3"], quantization="int8"), prompts))
    assert fused_runs


def logprob_errors(run, exact) -> list[float]:
    """The largest difference of the top logprobs of two runs at each decode step (not the first token, which the
    prefill gives) while their tokens still agree."""
    errs = []
    for a, b in zip(run, exact):
        for i, (ta, tb, la, lb) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids,
                                                 a.outputs[0].logprobs, b.outputs[0].logprobs)):
            if ta != tb:
                break
            if i:
                errs.append(max(abs(la[t].logprob - lb[t].logprob) for t in la.keys() & lb.keys()))
    return errs


@pytest.fixture(scope="module")
def bf16_exact_v3(ckpts, tmp_path_factory):
    """The v3 checkpoint with every weight rounded to bf16 and stored in fp32: what a bf16 model computes
    without rounding its activations."""
    from safetensors.torch import load_file, save_file
    src, dst = ckpts["v3"], tmp_path_factory.mktemp("v3-bf16-exact")
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16).float() for k, v in load_file(f).items()}, dst / f.name)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def test_fused_layers_run_bf16_weights_closer_to_exact_than_the_python_layers(ckpts, bf16_exact_v3, fused_runs):
    """bf16 weights: the C layer keeps activations in fp32 where the Python layers round them to bf16 after each
    op, so against the same weights computed in fp32 it is as close as the Python layers, or closer. Compared over
    all decode steps of six prompts: a single step's error is not a measure, since a near-tie of the random router
    flips an expert now and then (either path's largest error reaches 0.6-1.0 on some prompts)."""
    prompts = random_prompts([5, 17, 40, 9, 28, 33])
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=8)
    runs = [LLM(path, enforce_eager=eager, dtype=dtype, kv_cache_dtype="float32").generate(
        [{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        for path, eager, dtype in ((ckpts["v3"], False, "bfloat16"), (ckpts["v3"], True, "bfloat16"),
                                   (bf16_exact_v3, True, "float32"))]
    assert fused_runs and max(fused_runs) == len(prompts)
    err = {"fused": logprob_errors(runs[0], runs[2]), "plain": logprob_errors(runs[1], runs[2]),
           "between": logprob_errors(runs[0], runs[1])}
    assert min(map(len, err.values())) >= 20, "too few agreeing steps to compare"
    mean, median = ({k: f(v) for k, v in err.items()} for f in (statistics.mean, statistics.median))
    # bf16 logits of this random model (magnitudes near 30) are rounded in steps of 1/8: that bounds the agreement
    assert 0 < median["between"] < 0.15 and median["fused"] < 0.15, (mean, median)
    assert mean["fused"] <= mean["plain"] * 1.05, (mean, median)


@pytest.mark.parametrize("options", [{"enforce_eager": True}, {"cpu_kernels": False, "enforce_eager": False},
                                     {"mla_mode": "decompressed"}])
def test_switches_and_unsupported_weights_keep_the_python_layers(options, ckpts, fused_runs):
    llm = LLM(ckpts["v3"], **options)
    generate(llm, random_prompts([6, 9]))
    assert llm.engine.runner.fused is None and fused_runs == []


def test_two_llms_with_different_settings_do_not_affect_each_other(ckpts, fused_runs):
    prompts = random_prompts([5, 12])
    fused, plain = LLM(ckpts["v3"]), LLM(ckpts["v3"], cpu_kernels=False)
    first = generate(fused, prompts)
    assert fused_runs, "the first LLM decodes fused"
    del fused_runs[:]
    plain_out = generate(plain, prompts)
    assert fused_runs == [], "the second LLM's setting is its own"
    assert not plain.model.model.layers[0].input_layernorm.fused and fused.model.model.layers[0].input_layernorm.fused
    again = generate(fused, prompts)
    assert fused_runs, "creating the second LLM did not switch the first one's kernels off"
    assert_same(first, again)
    assert_same(first, plain_out)


def test_unsupported_matrices_are_refused_by_name_of_format():
    """GPTQ's column permutation and quantized kv_b have no fused path: the builder refuses them."""
    from dsinfer.models.fused_decode import LayerBuilder
    from dsinfer.quant.qtensor import QTensor
    builder, qt = LayerBuilder(True), QTensor.empty((64, 128), 8, 32)
    assert builder.mat(qt) is not None and builder.mat(qt, values_only=True) is None
    qt.perm = torch.arange(128)
    assert builder.mat(qt) is None
    assert builder.mat(torch.zeros(4, 8, dtype=torch.float16)) is None
    assert builder.mat(torch.zeros(8, 4).t()) is None  # not contiguous


class SwappedLayer(ctypes.Structure):  # LayerC with two fields in the wrong order
    _fields_ = [(n, t) for n, t in LayerC._fields_ if n not in ("dn", "dr")][:2] + \
        [("dr", ctypes.c_int64), ("dn", ctypes.c_int64)] + [(n, t) for n, t in LayerC._fields_[4:]]


class ShortStep(ctypes.Structure):  # StepC without its last field
    _fields_ = StepC._fields_[:-1]


def test_the_library_layout_matches_the_ctypes_mirrors():
    check_layout(kernels.library())  # also run when the library loads


def test_a_layout_that_differs_is_an_error_naming_the_field():
    with pytest.raises(LayoutError, match=r"SwappedLayer\.dn"):
        check_layout(kernels.library(), {0: SwappedLayer})
    with pytest.raises(LayoutError, match="lens"):
        check_layout(kernels.library(), {1: ShortStep})


@pytest.mark.parametrize("wide", ["1", "0"])
@pytest.mark.parametrize("name,options", [("v3", {}), ("v3", {"dtype": "bfloat16"}), ("v2-lite", {}),
                                          ("v3", {"quantization": "int8"})], ids=str)
def test_a_step_of_more_than_eight_tokens_is_two_steps_of_eight(name, options, wide, ckpts, monkeypatch):
    """A fused step of 9-16 tokens (a chunk of a speculative verify step) gives each token the bits two steps of
    at most eight give it, with the same cache rows: with wide_steps, fp32 / bf16 matrices and experts read
    once for all 16 rows; without, eight rows at a time (an expert chosen by more than eight tokens runs twice).
    Identical rows make every token choose the same experts. Rows split between threads (not tokens), so that
    the products take all the step's rows."""
    monkeypatch.setenv("DSINFER_WIDE_STEPS", wide)
    monkeypatch.setenv("DSINFER_TOKEN_PARALLEL", "0")
    llm = LLM(ckpts[name], max_model_len=64, enable_prefix_caching=False, **options)
    runner, decoder = llm.engine.runner, llm.engine.runner.fused
    assert decoder.step_tokens == 16
    values = "quantization" not in options
    assert all(layer.q_b.wide == int(wide == "1" and values) for layer in decoder.layers)
    ids, positions, meta = runner.inputs([(list(range(3, 19)), 0, [0])], num_prefills=0)
    x = torch.randn(1, llm.model.config.hidden_size).expand(16, -1).contiguous()
    moes = [layer.mlp for layer in llm.model.model.layers if hasattr(layer.mlp, "expert_counts")]
    for moe in moes:
        moe.expert_counts.zero_()
    whole = decoder.run_layers(x.clone(), positions, meta)
    assert max(int(moe.expert_counts.max()) for moe in moes) > 8  # an expert ran twice
    rows = [c.clone() for c in llm.engine.cache.layers]
    halves = torch.cat([decoder.run_layers(x[a:a + 8].clone(), positions[a:a + 8], decode_slice(meta, a, 8))
                        for a in (0, 8)])
    assert torch.equal(whole, halves)
    assert all(torch.equal(a, b) for a, b in zip(rows, llm.engine.cache.layers))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_parallel_layers_give_the_row_split_bits(dtype, ckpts, monkeypatch):
    """token_parallel: with two threads, a small layer's decode batch split by tokens (each run of tokens through
    the whole layer on one thread) gives every token the row-split path's bits, cache rows included."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for on in ("1", "0"):
            monkeypatch.setenv("DSINFER_TOKEN_PARALLEL", on)
            llm = LLM(ckpts["v3"], dtype=dtype, enable_prefix_caching=False)
            assert all(layer.token_parallel == int(on) for layer in llm.engine.runner.fused.layers)
            runs.append((generate(llm, random_prompts([5, 17, 40, 9])), [c.clone() for c in llm.engine.cache.layers]))
    finally:
        torch.set_num_threads(threads)
    (tokens, caches), (row_tokens, row_caches) = runs
    for a, b in zip(tokens, row_tokens):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [{t: p.logprob for t, p in la.items()} for la in a.outputs[0].logprobs] == \
            [{t: p.logprob for t, p in lb.items()} for lb in b.outputs[0].logprobs]
    assert all(torch.equal(a, b) for a, b in zip(caches, row_caches))


def test_large_or_quantized_layers_keep_the_row_split(ckpts, monkeypatch):
    """token_parallel applies to fp32 / bf16 layers whose token reads at most one core's L2 cache."""
    from dsinfer.models import fused_decode
    llm = LLM(ckpts["v3"], quantization="int8")
    assert not any(layer.token_parallel for layer in llm.engine.runner.fused.layers)
    small = LLM(ckpts["v3"])
    assert all(layer.token_parallel for layer in small.engine.runner.fused.layers)
    monkeypatch.setattr(fused_decode, "l2_bytes", lambda: 1024)  # a layer larger than the cache
    assert not any(layer.token_parallel for layer in LLM(ckpts["v3"]).engine.runner.fused.layers)


def test_token_parallel_layers_take_every_token_when_the_runtime_gives_fewer_threads(ckpts):
    """The runtime may give a parallel region fewer threads than asked (OMP_THREAD_LIMIT, OMP_DYNAMIC): the token
    runs follow the team it gave, so no token is left out."""
    code = f"""
import os, torch
torch.set_num_threads(2)
from dsinfer import LLM, SamplingParams
sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
runs = []
for on in ("1", "0"):
    os.environ["DSINFER_TOKEN_PARALLEL"] = on
    llm = LLM({str(ckpts["v3"])!r}, dtype="float32", enable_prefix_caching=False)
    outs = llm.generate([{{"prompt_token_ids": list(range(5, 5 + n))}} for n in (4, 9, 13)], sp, use_tqdm=False)
    runs.append([(o.outputs[0].token_ids, [[p.logprob for p in lp.values()] for lp in o.outputs[0].logprobs])
                 for o in outs])
print(runs[0] == runs[1])
"""
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("True"), out.stderr[-2000:]
