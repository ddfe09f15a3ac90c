"""The default model's training code on a tiny config: it trains, is deterministic, and writes a checkpoint
(with the MTP layer under DeepSeek's names) that dsinfer and transformers read as the same model."""
import pytest
import torch
from safetensors import safe_open

from dsinfer import LLM, SamplingParams
from dsinfer.tools.train import corpus
from dsinfer.tools.train.__main__ import run
from dsinfer.tools.train.modeling import Arch
from dsinfer.tools.train.trainer import TrainConfig
from tests.reference import hf_logprobs

TINY = Arch(vocab_size=400, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256)


def files(train_every: int = 60, val_every: int = 8):
    """A few training files and a few held-out ones (the split is by path hash)."""
    train, val = corpus.split(corpus.stdlib_files())
    return sorted(train[::train_every] + val[::val_every])


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


def test_dsinfer_and_transformers_agree_on_the_trained_checkpoint(trained):
    """The checkpoint as written (bf16 weights, fp32 router bias, HF names) means the same model to both: every
    prompt position's log-probabilities from dsinfer equal transformers' in fp32, for the prompt's own next
    token and for transformers' top 5."""
    out, _, _ = trained
    prompt = LLM(out).get_tokenizer().encode("def main(argv):\n    return sorted(argv)\n")
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5)
    ours = LLM(out, dtype="float32").generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0].prompt_logprobs
    ref = hf_logprobs(out, prompt)
    assert len(prompt) > 8 and ours[0] is None and len(ours) == len(prompt)
    for j in range(1, len(prompt)):
        want = {prompt[j]: ref[j - 1, prompt[j]].item()}
        want.update(zip(ref[j - 1].topk(5).indices.tolist(), ref[j - 1].topk(5).values.tolist()))
        for token, logprob in want.items():
            assert ours[j][token].logprob == pytest.approx(logprob, abs=1e-4)


def test_validation_split_is_disjoint_and_stable():
    train, val = corpus.split(corpus.stdlib_files())
    assert val and not set(train) & set(val) and corpus.split(corpus.stdlib_files()) == (train, val)


def test_model_card_reports_what_the_issue_asks(trained):
    _, card, _ = trained
    for needed in ("training files", "validation files", "Training time", "Final training loss", "perplexity",
                   "MTP head: next-next-token accuracy", "| MoE layer |", "Prompt `'def '`", "Prompt `'    return '`"):
        assert needed in card


def test_the_package_corpus_splits_by_path_stably():
    packages = corpus.files("packages")
    assert packages and all("site-packages" in f.parts or "dist-packages" in f.parts for f in packages)
    train, val = corpus.split(packages)
    assert val and not set(train) & set(val) and corpus.split(corpus.files("packages")) == (train, val)
    assert set(corpus.files("both")) == set(packages) | set(corpus.stdlib_files())
    with pytest.raises(ValueError, match="unknown corpus 'pypi'"):
        corpus.files("pypi")


def test_device_option(monkeypatch):
    from dsinfer.tools.train.__main__ import device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device("auto") == "cpu" and device("cpu") == "cpu"
    for name, message in (("cuda", "torch sees no CUDA device"), ("cuda:1", "torch sees no CUDA device"),
                          ("meta", "use auto, cpu or cuda"), ("gpu0", "--device")):
        with pytest.raises(SystemExit, match=message):
            device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device("auto") == "cuda" and device("cuda:1") == "cuda:1"


def test_the_card_names_the_corpus_and_where_it_trained(trained):
    _, card, _ = trained
    assert "on the Python standard library" in card and "CPU threads" in card
