"""The MTP draft layer (models/mtp.py): its forward against a plain-torch reference of the formula (the trainer's
transformers-based MTP layer on the same weights), and the errors of checkpoints that lack it."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from dsinfer import LLM
from dsinfer.engine.kv_cache import KVCache
from dsinfer.engine.model_runner import ModelRunner
from dsinfer import kernels
from dsinfer.kernels import PLAIN, KernelConfig
from dsinfer.models import load_model
from dsinfer.models.loader import CheckpointError, read_config
from dsinfer.models.mtp import FusedDraft, load_mtp
from tests.checkpoints import SPECS, add_mtp_layer, build_hf
from tests.conftest import random_prompts

SPEC = {"method": "mtp", "num_speculative_tokens": 2}


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    """A tiny V3 checkpoint with an MTP layer, and the transformers main model and reference MTP layer."""
    path = tmp_path_factory.mktemp("mtp") / "v3-mtp"
    hf = build_hf(*SPECS["v3"])
    hf.save_pretrained(path)
    return path, hf, add_mtp_layer(hf, path)


def mtp_logits(path, hidden, ids, kc: KernelConfig, one_by_one: bool) -> torch.Tensor:
    """dsinfer's MTP logits at positions 0 .. n-2 (h_i and t_{i+1}), as one prefill or one decode at a time (in
    one C call where kc asks for the fused decoder)."""
    cfg = read_config(path)
    model, _, names = load_model(path, cfg, torch.float32, torch.device("cpu"), "auto", kc)
    mtp = load_mtp(model, path, names, torch.float32, "cpu", "auto", kc)
    cache = KVCache(cfg, "float32", "cpu", 4, 16, extra_layers=1)
    runner, n, table = ModelRunner(model, cache), len(ids) - 1, list(range(4))
    fused = FusedDraft.build(model, mtp, cache.layers[-1])
    assert (fused is not None) == (kc.fused_decode and kernels.library() is not None)
    spans = [(i, i + 1) for i in range(n)] if one_by_one else [(0, n)]
    out = []
    for a, b in spans:
        x, positions, meta = runner.inputs([(ids[a + 1:b + 1], a, table)])
        out.append(mtp.compute_logits(mtp(x, hidden[a:b], positions, meta, cache.layers[-1], fused)))
    return torch.cat(out)


@pytest.mark.parametrize("options", [None, dict(fused_decode=False), dict(fused_decode=True)],
                         ids=["plain", "kernels", "fused"])
@pytest.mark.parametrize("one_by_one", [False, True], ids=["prefill", "decode"])
def test_mtp_forward_matches_reference(mtp_ckpt, options, one_by_one):
    """logits = head(shared_head.norm(layer(eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])))) at every position."""
    path, hf, ref_layer = mtp_ckpt
    ids = random_prompts((20,))[0]
    t = torch.tensor([ids])
    positions = torch.arange(len(ids) - 1)[None]
    with torch.no_grad():
        hidden = hf.model(input_ids=t).last_hidden_state
        ref = ref_layer.predict(hf, hidden[:, :-1], t[:, 1:], positions)[0]
    kc = PLAIN if options is None else KernelConfig.from_options(cpu_kernels=True, **options).resolve(torch.device("cpu"))
    ours = mtp_logits(path, hidden[0], ids, kc, one_by_one)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_checkpoint_without_mtp_layer_is_a_clear_error(ckpts):
    with pytest.raises(CheckpointError, match=r"MTP layer: tensors model\.layers\.4\.\*.*num_nextn_predict_layers"):
        LLM(ckpts["v3"], speculative_config=SPEC)


def test_missing_mtp_tensor_is_named(mtp_ckpt, tmp_path):
    path, _, _ = mtp_ckpt
    dst = tmp_path / "partial"
    dst.mkdir()
    for f in ("config.json",):
        (dst / f).write_bytes((path / f).read_bytes())
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.4.hnorm.weight"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model\.layers\.4\.hnorm\.weight"):
        LLM(dst, speculative_config=SPEC)
    assert LLM(dst).mtp_tensors  # without speculation the layer is only set aside, as before


def mtp_setup(path, kc: KernelConfig, quantization: str | None = None, dtype: torch.dtype = torch.float32):
    cfg = read_config(path)
    model, _, names = load_model(path, cfg, dtype, torch.device("cpu"), "auto", kc)
    mtp = load_mtp(model, path, names, dtype, "cpu", "auto", kc, quantization)
    cache = KVCache(cfg, str(dtype).removeprefix("torch."), "cpu", 4, 16, extra_layers=1)
    return mtp, cache, ModelRunner(model, cache), FusedDraft.build(model, mtp, cache.layers[-1])


@pytest.mark.parametrize("fused", [False, True], ids=["python", "fused"])
def test_kept_rows_are_the_rows_of_the_whole_output(mtp_ckpt, fused):
    """keep (spec_draft_last_rows): the MoE / MLP runs for the kept rows only; they and every cache row come out
    exactly as without it."""
    path, _, _ = mtp_ckpt
    kc = KernelConfig.from_options(cpu_kernels=True, fused_decode=fused).resolve(torch.device("cpu"))
    mtp, cache, runner, draft = mtp_setup(path, kc)
    if fused and draft is None:
        pytest.skip("no fused decoder here (no C kernels)")
    ids = random_prompts((7,))[0]
    hidden = torch.randn(6, read_config(path).hidden_size)
    x, positions, meta = runner.inputs([(ids[1:4], 0, [0, 1]), (ids[4:7], 0, [2, 3])], num_prefills=0)
    whole = mtp(x, hidden, positions, meta, cache.layers[-1], draft)
    rows = cache.layers[-1].clone()
    keep = torch.tensor([2, 5])
    kept = mtp(x, hidden, positions, meta, cache.layers[-1].zero_(), draft, keep)
    assert torch.equal(kept, whole[keep]) and torch.equal(cache.layers[-1], rows)


@pytest.mark.parametrize("quantization, bits", [("int8", 8), ("int4", 4)])
def test_quantized_draft_is_close_to_the_full_precision_one(mtp_ckpt, quantization, bits):
    """spec_draft_quantization: the layer's matrices and a copy of the head become QTensors (the main model's head
    stays as it is), the fused draft takes them, and the draft's logits stay close to the full-precision ones (a
    broken scale or layout is off by more than their norm)."""
    path, _, _ = mtp_ckpt
    kc = KernelConfig.from_options(cpu_kernels=True).resolve(torch.device("cpu"))
    (full, cache, runner, fused), (quant, qcache, _, qfused) = mtp_setup(path, kc), mtp_setup(path, kc, quantization)
    assert quant.draft_head.bits == bits and quant.eh_proj.weight.bits == bits
    assert quant.mlp.experts.gate_up_proj.bits == bits and isinstance(quant.main[0].lm_head.weight, torch.Tensor)
    assert (qfused is None) == (fused is None)
    ids = random_prompts((9,))[0]
    hidden = torch.randn(8, read_config(path).hidden_size)
    x, positions, meta = runner.inputs([(ids[1:], 0, [0])], num_prefills=0)
    want = full.compute_logits(full(x, hidden, positions, meta, cache.layers[-1], fused))
    got = quant.compute_logits(quant(x, hidden, positions, meta, qcache.layers[-1], qfused))
    error = ((got - want).norm(dim=1) / want.norm(dim=1)).median()  # a row whose router flips is far off
    assert 0 < error < (0.06 if bits == 8 else 0.8)  # random weights: int4 loses far more (unrelated rows: ~1.4)


def test_bad_draft_quantization_is_a_clear_error():
    with pytest.raises(ValueError, match="spec_draft_quantization must be one of .*auto.*int8.*got 'int3'"):
        LLM(speculative_config=SPEC, spec_draft_quantization="int3")


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_bound_draft_logits_are_the_layers_logits(mtp_ckpt, quantization):
    """FusedDraft.logits (the head's kernel bound once) gives exactly MTPLayer.compute_logits' numbers."""
    path, _, _ = mtp_ckpt
    kc = KernelConfig.from_options(cpu_kernels=True).resolve(torch.device("cpu"))
    mtp, _, _, fused = mtp_setup(path, kc, quantization)
    if fused is None:
        pytest.skip("no fused decoder here (no C kernels)")
    for rows in (1, 3, 9):  # 9: more than the kernels' rows, the layer's own path
        hidden = torch.randn(rows, read_config(path).hidden_size)
        assert torch.equal(fused.logits(hidden), mtp.compute_logits(hidden))


def test_draft_in_chunks_is_the_draft_token_by_token(mtp_ckpt):
    """spec_chunk_drafts: a decode catch-up of more than MAX_M tokens runs the fused layer MAX_M at a time and
    gives what the fused layer gives one decode at a time (each token attends through the cache as it would)."""
    path, _, _ = mtp_ckpt
    kc = KernelConfig.from_options(cpu_kernels=True).resolve(torch.device("cpu"))
    mtp, cache, runner, fused = mtp_setup(path, kc)
    if fused is None:
        pytest.skip("no fused decoder here (no C kernels)")
    ids = random_prompts((kernels.MAX_M + 4,))[0]
    hidden = torch.randn(len(ids) - 1, read_config(path).hidden_size)
    x, positions, meta = runner.inputs([(ids[1:], 0, [0])], num_prefills=0)
    chunked = mtp(x, hidden, positions, meta, cache.layers[-1], fused, torch.tensor([2, len(ids) - 2]))
    alone = []
    for i in range(len(ids) - 1):
        x, positions, meta = runner.inputs([(ids[i + 1:i + 2], i, [0])], num_prefills=0)
        alone.append(mtp(x, hidden[i:i + 1], positions, meta, cache.layers[-1], fused))
    torch.testing.assert_close(chunked, torch.cat([alone[2], alone[-1]]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
@pytest.mark.parametrize("keep", [None, [1, 4]], ids=["all-rows", "kept-rows"])
def test_one_call_draft_is_the_fused_draft(mtp_ckpt, dtype, quantization, keep):
    """spec_draft_one_call: decode_draft.c gives the fused draft's output, cache rows, head logits and argmax,
    the same bits (the same kernels in the same order), for fp32 and bf16 tables and hidden states."""
    path, _, _ = mtp_ckpt
    kc = KernelConfig.from_options(cpu_kernels=True).resolve(torch.device("cpu"))
    mtp, cache, runner, fused = mtp_setup(path, kc, quantization, dtype)
    if fused is None or fused.struct is None:
        pytest.skip("no fused decoder here (no C kernels)")
    ids = random_prompts((7,))[0]
    hidden = torch.randn(6, read_config(path).hidden_size).to(dtype)
    x, positions, meta = runner.inputs([(ids[1:4], 0, [0, 1]), (ids[4:7], 0, [2, 3])], num_prefills=0)
    rows = None if keep is None else torch.tensor(keep)
    want = fused(x, hidden, positions, meta, rows)
    want_cache = cache.layers[-1].clone()
    out, logits = fused.one_call(x, hidden, positions, meta, rows)
    assert torch.equal(out, want) and torch.equal(cache.layers[-1], want_cache)
    assert torch.equal(logits, fused.logits(want))


def test_one_call_draft_names_bad_input(mtp_ckpt):
    """A token id outside the table or a kept row outside the batch is an error naming the C call's code."""
    path, _, _ = mtp_ckpt
    kc = KernelConfig.from_options(cpu_kernels=True).resolve(torch.device("cpu"))
    mtp, cache, runner, fused = mtp_setup(path, kc)
    if fused is None or fused.struct is None:
        pytest.skip("no fused decoder here (no C kernels)")
    x, positions, meta = runner.inputs([([5, 6], 0, [0])], num_prefills=0)
    hidden = torch.randn(2, read_config(path).hidden_size)
    with pytest.raises(RuntimeError, match="token id outside the embedding table"):
        fused.one_call(torch.tensor([5, 10 ** 6]), hidden, positions, meta)
    with pytest.raises(RuntimeError, match="kept row outside the batch"):
        fused.one_call(x, hidden, positions, meta, torch.tensor([2]))
