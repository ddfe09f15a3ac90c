"""The built-in default model shipped in the package: layout, architecture, MTP layer, and agreement with
transformers on the same weights."""
import json
import subprocess
import sys

import pytest

import dsinfer
from dsinfer import DEFAULT_MODEL, LLM, SamplingParams
from dsinfer.tools.train.card import PROMPTS
from tests.reference import hf_greedy

FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md"]


@pytest.fixture(scope="module")
def default_llm():
    return LLM()


def test_files_and_size():
    assert all((DEFAULT_MODEL / f).is_file() for f in FILES)
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size <= 21 * 2**20


def test_architecture_is_deepseek_v3_with_one_mtp_layer(default_llm):
    raw = json.loads((DEFAULT_MODEL / "config.json").read_text())
    cfg = default_llm.model.config
    assert raw["model_type"] == "deepseek_v3" and raw["num_nextn_predict_layers"] == 1
    assert cfg.num_hidden_layers >= 4 and not cfg.is_moe_layer(0) and cfg.is_moe_layer(1)
    assert cfg.q_lora_rank and cfg.kv_lora_rank and cfg.n_routed_experts >= 8 and cfg.num_experts_per_tok == 2
    assert cfg.n_shared_experts == 1 and cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc"
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "self_attn.kv_b_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert mtp + name in default_llm.mtp_tensors


def test_router_bias_was_balanced_during_training(default_llm):
    biases = [layer.mlp.gate.e_score_correction_bias for layer in default_llm.model.model.layers[1:]]
    assert all(b is not None and b.abs().max() > 0 for b in biases)


def test_greedy_tokens_match_transformers(default_llm):
    tok = default_llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    ours = [o.outputs[0].token_ids for o in default_llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
        use_tqdm=False)]
    assert ours == [hf_greedy(DEFAULT_MODEL, p, 32) for p in prompts]


def test_cli_uses_the_default_model():
    r = subprocess.run([sys.executable, "-m", "dsinfer", "generate", "def fibonacci(n):", "--max-tokens", "16"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_missing_default_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(dsinfer.models.loader, "DEFAULT_MODEL", tmp_path)
    with pytest.raises(ValueError, match="built-in default model is missing"):
        LLM()
