"""The default model's training code on a tiny config: it trains, is deterministic, and writes a checkpoint
(with the MTP layer under DeepSeek's names) that both dsinfer and transformers load."""
import pytest
import torch
from safetensors import safe_open

from dsinfer import LLM, SamplingParams
from dsinfer.train import corpus
from dsinfer.train.__main__ import run
from dsinfer.train.modeling import Arch
from dsinfer.train.trainer import TrainConfig

TINY = Arch(vocab_size=400, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256)


def files():
    """A few training files and a few held-out ones (the split is by path hash)."""
    train, val = corpus.split(corpus.stdlib_files())
    return sorted(train[::60] + val[::8])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "model"
    cfg = TrainConfig(steps=12, batch_size=4, seq_len=32, warmup=2, eval_every=6)
    card, log = run(out, TINY, cfg, files=files(), threads=torch.get_num_threads())
    return out, card, log


def test_training_lowers_the_loss(trained):
    _, _, log = trained
    assert len(log.losses) == 12 and log.losses[-1] < log.losses[0] and len(log.evals) == 2


def test_same_seed_same_run(trained, tmp_path):
    cfg = TrainConfig(steps=12, batch_size=4, seq_len=32, warmup=2, eval_every=6)
    _, again = run(tmp_path / "again", TINY, cfg, files=files(), threads=torch.get_num_threads(), with_card=False)
    assert again.losses == trained[2].losses


def test_checkpoint_has_the_mtp_layer_and_loads_in_both(trained):
    out, _, _ = trained
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    mtp = "model.layers.4."
    assert {mtp + n for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                              "mlp.experts.7.down_proj.weight")} <= names
    assert bias.abs().max() > 0  # the balancing rule moved it
    llm = LLM(out)
    assert set(llm.mtp_tensors) == {n for n in names if n.startswith(mtp)}
    assert llm.generate("def ", SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


def test_validation_split_is_disjoint_and_stable():
    train, val = corpus.split(corpus.stdlib_files())
    assert val and not set(train) & set(val) and corpus.split(corpus.stdlib_files()) == (train, val)


def test_model_card_reports_what_the_issue_asks(trained):
    _, card, _ = trained
    for needed in ("training files", "validation files", "Training time", "Final training loss", "perplexity",
                   "MTP head: next-next-token accuracy", "| MoE layer |", "Prompt `'def '`", "Prompt `'    return '`"):
        assert needed in card
