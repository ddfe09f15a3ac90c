"""Tiny DeepSeek checkpoints made with transformers' own classes and save_pretrained (random weights with a
raised init scale so logits are peaked), an FP8 re-encoding of one, and a small trained BPE tokenizer.

    python -m tests.checkpoints OUT_DIR     # writes OUT_DIR/{v2-lite,v2,v3,v3-fp8}
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
              num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
              n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=512, initializer_range=0.25,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32, beta_slow=1)

SPECS = {
    "v2-lite": ("v2", dict(q_lora_rank=None, num_hidden_layers=3, n_shared_experts=2, first_k_dense_replace=1,
                           topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                           rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
    "v2": ("v2", dict(q_lora_rank=48, num_hidden_layers=3, n_shared_experts=2, first_k_dense_replace=1,
                      topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0,
                      norm_topk_prob=False, rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0))),
    "v3": ("v3", dict(q_lora_rank=48, num_hidden_layers=4, n_shared_experts=1, first_k_dense_replace=2,
                      n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                      rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0))),
}
# Small tiles so that the tiny shapes have several, and sizes that divide none of the FP8 weights' dimensions
# (32, 48, 64, 96, 128, 160): every weight has a partial last tile in both dims. Not square, so that swapping
# the two block sizes is caught too.
FP8_BLOCK = [28, 20]


def build_hf(kind: str, kw: dict, seed: int = 0):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    if kind == "v2":
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**COMMON, **kw))
    else:
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**COMMON, **kw))
        for layer in model.model.layers[kw["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)  # a real bias, so selection != weights
    return model.eval()


def add_mtp_layer(model, out: Path, seed: int = 1):
    """Appends one MTP layer (model.layers.{L}: enorm, hnorm, eh_proj, a MoE decoder layer, shared_head.norm), drawn
    at the model's raised init scale, to a saved V3 checkpoint, and sets num_nextn_predict_layers = 1."""
    from dsinfer.tools.train.modeling import MTPLayer, mtp_tensors
    torch.manual_seed(seed)
    mtp = MTPLayer(model.config)
    for module in mtp.modules():
        model._init_weights(module)
    mtp.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    tensors = load_file(out / "model.safetensors") | mtp_tensors(mtp, model.config.num_hidden_layers)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, num_nextn_predict_layers=1), indent=2))
    return mtp.eval()


def write_tokenizer(out: Path, vocab_size: int = 512):
    """Byte-level BPE trained on a few standard-library files, with <bos>/<eos>/<pad> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    import json as corpus_mod
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    files = [str(Path(corpus_mod.__file__).parent / f) for f in ("decoder.py", "encoder.py", "scanner.py")]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    tok.save(str(out / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True,
         "chat_template": template}))


def fp8_encode(w: torch.Tensor, block=FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile absmax scaling to float8_e4m3fn, DeepSeek's layout (scale_inv multiplies back)."""
    rows, cols = w.shape
    bo, bi = block
    scale = torch.zeros(-(-rows // bo), -(-cols // bi))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi].float()
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def is_fp8_target(name: str, t: torch.Tensor) -> bool:
    skip = ("embed_tokens", "lm_head", "layernorm", "norm.weight", "mlp.gate.weight", "e_score_correction_bias")
    return t.dim() == 2 and not any(s in name for s in skip)


def write_fp8(src: Path, out: Path, ref: Path):
    """out: src re-encoded as DeepSeek FP8; ref: the same weights dequantized to fp32 (what transformers loads) by
    the tests' own dequantization, so that the exactness tests check dsinfer's."""
    from tests.reference import fp8_block_dequant
    tensors = load_file(src / "model.safetensors")
    fp8, deq = {}, {}
    for name, t in tensors.items():
        if is_fp8_target(name, t):
            q, s = fp8_encode(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            deq[name] = fp8_block_dequant(q, s, FP8_BLOCK)
        else:
            fp8[name] = deq[name] = t
    cfg = json.loads((src / "config.json").read_text())
    for d, weights, qc in ((out, fp8, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": FP8_BLOCK}), (ref, deq, None)):
        d.mkdir(parents=True, exist_ok=True)
        save_file(weights, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(dict(cfg, **({"quantization_config": qc} if qc else {}))))


def build_all(root: Path) -> dict[str, Path]:
    paths = {}
    for name, (kind, kw) in SPECS.items():
        paths[name] = root / name
        build_hf(kind, kw).save_pretrained(paths[name])
    write_tokenizer(paths["v3"])
    paths["v3-mtp"] = root / "v3-mtp"
    model = build_hf(*SPECS["v3"])
    model.save_pretrained(paths["v3-mtp"])
    add_mtp_layer(model, paths["v3-mtp"])
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (paths["v3-mtp"] / f).write_bytes((paths["v3"] / f).read_bytes())
    paths["v3-fp8"], paths["v3-fp8-ref"] = root / "v3-fp8", root / "v3-fp8-ref"
    write_fp8(paths["v3"], paths["v3-fp8"], paths["v3-fp8-ref"])
    return paths


if __name__ == "__main__":
    for name, path in build_all(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
