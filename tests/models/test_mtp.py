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
