"""GPTQ checkpoints in the hub's layout: one written here the way AutoGPTQ packs them (asymmetric zero points
stored minus one, activation-order g_idx, fp16 scales, lm_head left in full precision) loads and computes the
same logits as its dequantized weights; bad ones get errors that name the problem."""
import json
import shutil
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsinfer import LLM, kernels
from dsinfer.engine.model_runner import score
from dsinfer.models.loader import CheckpointError
from dsinfer.quant import gptq_format
from tests.conftest import random_prompts


def autogptq_quantize(w: torch.Tensor, bits: int, group: int, desc_act: bool, seed: int):
    """Asymmetric min/max quantization and AutoGPTQ's packing loops, written out independently of dsinfer.
    Returns the four hub tensors and the weight they decode to."""
    n, k = w.shape
    f, maxq = 32 // bits, (1 << bits) - 1
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if desc_act else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = torch.arange(k, dtype=torch.int32) // group
    ng = -(-k // group)
    scales, zeros = torch.empty(ng, n), torch.empty(ng, n, dtype=torch.int64)
    for g in range(ng):
        cols = w[:, g_idx == g]
        lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        s = ((hi - lo) / maxq).clamp(min=1e-5).half().float()
        scales[g], zeros[g] = s, (-lo / s).round().clamp(1, maxq).long()  # zero >= 1: v1 stores zero - 1
    s_col, z_col = scales[g_idx.long()].t(), zeros[g_idx.long()].t()  # [N, K]
    intw = ((w / s_col).round() + z_col).clamp(0, maxq).long()
    deq = (s_col * (intw - z_col)).contiguous()
    qweight = torch.zeros(k // f, n, dtype=torch.int64)
    for row in range(k // f):
        for j in range(f):
            qweight[row] |= intw[:, row * f + j] << (bits * j)
    qzeros = torch.zeros(ng, n // f, dtype=torch.int64)
    for col in range(n // f):
        for j in range(f):
            qzeros[:, col] |= (zeros[:, col * f + j] - 1) << (bits * j)
    as_int32 = lambda t: torch.where(t >= 1 << 31, t - (1 << 32), t).to(torch.int32)
    return {"qweight": as_int32(qweight), "qzeros": as_int32(qzeros), "scales": scales.half(), "g_idx": g_idx}, deq


def write_gptq(src, out, ref, bits: int, group: int, desc_act: bool, shared_order: bool = True):
    """shared_order: gate_proj and up_proj see the same inputs, so GPTQ gives them the same activation order."""
    tensors = load_file(src / "model.safetensors")
    quant, dense = {}, {}
    for i, (name, t) in enumerate(sorted(tensors.items())):
        if name.startswith("model.layers.") and name.endswith("proj.weight") and t.dim() == 2:
            seed = zlib.crc32(name.replace("up_proj", "gate_proj").encode()) if shared_order else i
            packed, deq = autogptq_quantize(t.float(), bits, group, desc_act, seed)
            quant.update({name[:-6] + key: v for key, v in packed.items()})
            dense[name] = deq
        else:
            quant[name] = dense[name] = t
    cfg = json.loads((src / "config.json").read_text())
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": False,
          "checkpoint_format": "gptq"}
    for d, weights, extra in ((out, quant, {"quantization_config": qc}), (ref, dense, {})):
        d.mkdir(parents=True, exist_ok=True)
        save_file(weights, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(dict(cfg, **extra)))
        shutil.copy(src / "tokenizer.json", d / "tokenizer.json")


@pytest.mark.parametrize("bits,group,desc_act", [(4, 32, True), (4, 128, False), (8, 16, True)])
def test_hub_gptq_checkpoint_loads_and_matches_its_dequantized_weights(ckpts, tmp_path, bits, group, desc_act,
                                                                       monkeypatch):
    monkeypatch.setenv("DSINFER_INT8_ACTIVATIONS", "0")  # exact weights, exact activations
    write_gptq(ckpts["v3"], tmp_path / "gptq", tmp_path / "ref", bits, group, desc_act)
    quant, ref = LLM(tmp_path / "gptq"), LLM(tmp_path / "ref")
    assert quant.quantization["model.layers.2.mlp.experts.gate_up_proj"] == bits
    assert quant.quantization["lm_head.weight"] == 16  # not quantized in the checkpoint
    for prompt in random_prompts([7, 30]):
        torch.testing.assert_close(score(quant.model, prompt), score(ref.model, prompt), rtol=2e-4, atol=2e-4)
    out = quant.generate([{"prompt_token_ids": random_prompts([9])[0]}], use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) > 0


def test_pack_and_unpack_round_trip():
    codes = torch.randint(-8, 8, (24, 200), dtype=torch.int8)
    scales = torch.rand(24, 2).half().float()
    t = gptq_format.pack(codes, scales, 4, 128)
    back, s, mins, perm = gptq_format.unpack(t, 4, 128, 24, 200, False, "x")
    assert torch.equal(back, codes) and torch.equal(s, scales) and mins is None and perm is None


def _edit(src, dst, config=None, drop=None, replace=None):
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"].update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop or replace:
        t = load_file(dst / "model.safetensors")
        t.pop(drop, None)
        t.update(replace or {})
        save_file(t, dst / "model.safetensors")
    return dst


@pytest.fixture(scope="module")
def gptq_ckpt(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    write_gptq(ckpts["v3"], root / "gptq", root / "ref", 4, 32, False)
    return root / "gptq"


@pytest.mark.parametrize("edit,message", [
    (dict(config={"bits": 3}), "4- and 8-bit GPTQ"),
    (dict(config={"group_size": 0}), "group_size must be -1 or a positive int"),
    (dict(config={"checkpoint_format": "marlin"}), "checkpoint_format 'marlin'"),
    (dict(drop="model.layers.0.self_attn.o_proj.qzeros"), "model.layers.0.self_attn.o_proj.qzeros"),
    (dict(drop="model.layers.2.mlp.experts.3.up_proj.qweight"), "experts.3.up_proj.qweight is missing"),
    (dict(replace={"model.layers.0.self_attn.o_proj.scales": torch.ones(2, 64, dtype=torch.float16)}),
     "o_proj.scales has shape (2, 64)"),
])
def test_bad_gptq_checkpoints_name_the_problem(gptq_ckpt, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(_edit(gptq_ckpt, tmp_path / "bad", **edit))


def test_fused_matrices_with_different_activation_orders_are_refused(ckpts, tmp_path):
    write_gptq(ckpts["v3"], tmp_path / "gptq", tmp_path / "ref", 4, 32, True, shared_order=False)
    with pytest.raises(CheckpointError, match="up_proj.g_idx orders the input differently"):
        LLM(tmp_path / "gptq")


def test_quantizing_a_gptq_checkpoint_again_is_refused(gptq_ckpt):
    with pytest.raises(ValueError, match="GPTQ checkpoint already"):
        LLM(gptq_ckpt, quantization="int4")
