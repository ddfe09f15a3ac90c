"""Checkpoint loading: layouts that must load, and bad input that must fail with an error naming the problem."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsinfer import LLM, SamplingParams
from dsinfer.models.loader import CheckpointError, checkpoint_views, read_config
from tests.conftest import random_prompts


def copy_ckpt(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors")
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def greedy(llm, prompt, n=8):
    return llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]


def test_sharded_checkpoint_with_index(ckpts, llms, tmp_path):
    """Real checkpoints come in shards listed by model.safetensors.index.json."""
    dst = copy_ckpt(ckpts["v3"], tmp_path / "sharded")
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, dst / file)
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    prompt = random_prompts((9,))[0]
    assert greedy(LLM(dst), prompt).outputs[0].token_ids == greedy(llms("v3"), prompt).outputs[0].token_ids


def assert_weights_equal(llm, tensors: dict):
    """Every checkpoint tensor landed, unchanged, where the model reads it."""
    views = checkpoint_views(llm.model)
    assert set(views) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(views[name].float(), t.float()), name


def test_shards_without_index(ckpts, llms, tmp_path):
    dst = copy_ckpt(ckpts["v2"], tmp_path / "noindex")
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    for i, file in enumerate(("a", "b", "c")):
        save_file({n: tensors[n] for n in names[i::3]}, dst / f"{file}.safetensors")
    llm = LLM(dst)
    assert_weights_equal(llm, tensors)
    prompt = random_prompts((9,))[0]
    assert greedy(llm, prompt).outputs[0].token_ids == greedy(llms("v2"), prompt).outputs[0].token_ids


def test_fp8_weights_load_as_the_reference_dequantization(ckpts, llms):
    """The FP8 checkpoint (partial tiles at every edge) loads to the tests' own dequantization of it."""
    assert_weights_equal(llms("v3-fp8"), load_file(ckpts["v3-fp8-ref"] / "model.safetensors"))


def test_mtp_layer_is_kept_aside(ckpts, tmp_path):
    """DeepSeek-V3 ships its MTP module as model.layers.{num_hidden_layers}.*: recognised, not an error."""
    def add_mtp(t):
        t["model.layers.4.enorm.weight"] = torch.ones(64)
        t["model.layers.4.eh_proj.weight"] = torch.zeros(64, 128)
        t["model.layers.4.self_attn.kv_b_proj.weight"] = torch.zeros(4 * 40, 32)
    llm = LLM(copy_ckpt(ckpts["v3"], tmp_path / "mtp", add_mtp))
    assert sorted(llm.mtp_tensors) == ["model.layers.4.eh_proj.weight", "model.layers.4.enorm.weight",
                                       "model.layers.4.self_attn.kv_b_proj.weight"]


def test_without_tokenizer_takes_token_ids_and_warns(ckpts, llms, caplog):
    llm = llms("v2")
    assert llm.get_tokenizer() is None
    out = greedy(llm, [5, 6, 7])
    assert out.outputs[0].text == "" and len(out.outputs[0].token_ids) == 8
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer")
    caplog.clear()
    LLM(ckpts["v2"])
    assert "no tokenizer.json" in caplog.text


@pytest.mark.parametrize("case, message", [
    ("nodir", "is not a directory"),
    ("noconfig", "has no config.json"),
    ("badjson", "not valid JSON"),
    ("model_type", "unsupported model_type 'llama'; dsinfer supports deepseek_v2, deepseek_v3"),
    ("missing_key", "missing required key.*kv_lora_rank"),
    ("noweights", "has no \\*.safetensors"),
    ("quant", "unsupported quantization_config.quant_method 'awq'"),
    ("topk_method", "unsupported topk_method 'random'"),
])
def test_bad_directories_and_configs(case, message, ckpts, tmp_path):
    dst = tmp_path / case
    if case != "nodir":
        copy_ckpt(ckpts["v2"], dst)
    edits = {"model_type": lambda c: c.update(model_type="llama"), "missing_key": lambda c: c.pop("kv_lora_rank"),
             "quant": lambda c: c.update(quantization_config={"quant_method": "awq"}),
             "topk_method": lambda c: c.update(topk_method="random")}
    if case == "noconfig":
        (dst / "config.json").unlink()
    elif case == "badjson":
        (dst / "config.json").write_text("{not json")
    elif case == "noweights":
        (dst / "model.safetensors").unlink()
    elif case in edits:
        copy = json.loads((dst / "config.json").read_text())
        edits[case](copy)
        (dst / "config.json").write_text(json.dumps(copy))
    with pytest.raises(CheckpointError, match=message):
        LLM(dst)


def test_missing_tensor_is_named(ckpts, tmp_path):
    dst = copy_ckpt(ckpts["v3"], tmp_path / "m", lambda t: t.pop("model.layers.3.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.3.mlp.experts.5.up_proj.weight"):
        LLM(dst)


def test_wrong_shape_is_named(ckpts, tmp_path):
    def bad(t):
        t["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(7, 32)
    with pytest.raises(CheckpointError, match=r"kv_b_proj.weight has shape \(7, 32\), expected \(160, 32\)"):
        LLM(copy_ckpt(ckpts["v2"], tmp_path / "s", bad))


@pytest.mark.parametrize("cut", [4, 100, -200])
def test_truncated_or_corrupt_file(cut, ckpts, tmp_path):
    dst = copy_ckpt(ckpts["v2"], tmp_path / "t")
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM(dst)


def test_garbage_file(ckpts, tmp_path):
    dst = copy_ckpt(ckpts["v2"], tmp_path / "g")
    (dst / "model.safetensors").write_bytes(b"\x00" * 64 + b"not a safetensors file" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        LLM(dst)


def test_index_naming_absent_shard(ckpts, tmp_path):
    dst = copy_ckpt(ckpts["v2"], tmp_path / "i")
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        LLM(dst)


def test_fp8_without_scale(ckpts, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    dst = copy_ckpt(ckpts["v3-fp8"], tmp_path / "f", lambda t: t.pop(name + "_scale_inv"))
    with pytest.raises(CheckpointError, match=f"fp8 tensor {name} has no {name}_scale_inv"):
        LLM(dst)


def test_fp8_scale_of_wrong_shape(ckpts, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    dst = copy_ckpt(ckpts["v3-fp8"], tmp_path / "f", lambda t: t.update({name + "_scale_inv": torch.ones(1, 1)}))
    with pytest.raises(CheckpointError, match=r"o_proj.weight_scale_inv has shape \(1, 1\), expected \(3, 5\)"):
        LLM(dst)


def test_rope_parameters_and_rope_scaling_keys_agree(ckpts, tmp_path):
    """Newer transformers write rope_parameters; hub checkpoints have rope_scaling."""
    def old_style(c):
        c["rope_scaling"] = c.pop("rope_parameters")
        c["rope_theta"] = c["rope_scaling"].pop("rope_theta")
    dst = copy_ckpt(ckpts["v2-lite"], tmp_path / "old", edit_config=old_style)
    assert read_config(dst).rope_scaling == read_config(ckpts["v2-lite"]).rope_scaling
    assert read_config(dst).rope_scaling["mscale_all_dim"] == 0.707
    assert read_config(dst).rope_theta == read_config(ckpts["v2-lite"]).rope_theta == 10000.0
