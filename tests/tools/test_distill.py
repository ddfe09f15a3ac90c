"""Self-distillation of the MTP layer on a tiny trained checkpoint: it reads back what training wrote, aligns the
teacher with the MTP's target, lowers the held-out KL, and rewrites only the MTP layer's tensors."""
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsinfer import LLM, SamplingParams
from dsinfer.tools.train import modeling
from dsinfer.tools.train.__main__ import run as train_run
from dsinfer.tools.train.distill import DistillConfig, distill_losses, run, write
from dsinfer.tools.train.trainer import TrainConfig
from tests.tools.test_train import TINY, files

CFG = DistillConfig(steps=16, batch_size=8, seq_len=32, warmup=2, eval_every=8, lr=1e-2)

FILES = dict(train_every=120, val_every=20)  # 6 training files, 2 held out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "model"
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, warmup=2, eval_every=4)
    train_run(out, TINY, cfg, files=files(**FILES), threads=torch.get_num_threads(), with_card=False)
    return out


@pytest.fixture(scope="module")
def distilled(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "distilled"
    text, log = run(checkpoint, out, CFG, files=files(**FILES), threads=torch.get_num_threads())
    return out, text, log


def test_load_reads_back_what_save_wrote(checkpoint, tmp_path):
    main, mtp = modeling.load(checkpoint)
    modeling.save(main, mtp, tmp_path)
    before, after = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(before) == set(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name


def test_the_teacher_of_mtp_position_i_is_the_main_model_at_i_plus_1(checkpoint):
    """An MTP that answers with the main model's own next prediction has KL 0 and full agreement; a teacher off
    by one position would not."""
    main, _ = modeling.load(checkpoint)
    batch = torch.randint(3, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    def oracle(main, hidden, next_ids, positions):
        assert torch.equal(next_ids, batch[:, 1:11])
        full = main.model(input_ids=batch[:, :11], position_ids=torch.arange(11).unsqueeze(0)).last_hidden_state
        return main.lm_head(full[:, 1:])

    with torch.no_grad():
        out = distill_losses(main, SimpleNamespace(predict=oracle), batch)
    assert out["kl"].item() == pytest.approx(0, abs=1e-5) and out["agree"].item() == 1.0


def test_distillation_lowers_the_held_out_kl(distilled):
    _, _, log = distilled
    start, end = log.evals[0][1], log.final
    assert [step for step, _ in log.evals] == [0, 8, 16] and len(log.losses) == 16
    assert end["kl"] < start["kl"]


def test_only_the_mtp_layer_changes(checkpoint, distilled):
    out, _, _ = distilled
    before, after = load_file(checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    mtp = f"model.layers.{TINY.num_hidden_layers}."
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith(mtp) for n in changed)
    assert "model.layers.4.eh_proj.weight" in changed
    assert all(before[n].dtype == after[n].dtype for n in before)
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()


def test_the_distilled_checkpoint_speculates(distilled):
    out, _, _ = distilled
    params = SamplingParams(temperature=0, max_tokens=12)
    plain = LLM(out).generate("def ", params, use_tqdm=False)[0].outputs[0].token_ids
    spec = LLM(out, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    assert spec.generate("def ", params, use_tqdm=False)[0].outputs[0].token_ids == plain


def test_the_card_section_is_replaced_not_repeated(distilled, tmp_path):
    out, text, log = distilled
    card = (out / "MODEL_CARD.md").read_text()
    assert card.count("## MTP layer: self-distillation") == 1 and "| next-next-token accuracy |" in card
    from dsinfer.tools.train.card import add_distillation
    stats = dict(threads=1, kind="stdlib", train_files=1, val_files=1, val_tokens=1)
    add_distillation(out, cfg=CFG, corpus=stats, log=log)
    assert (out / "MODEL_CARD.md").read_text().count("## MTP layer: self-distillation") == 1


def test_a_checkpoint_without_the_mtp_layer_is_refused(checkpoint, tmp_path):
    main, _ = modeling.load(checkpoint)
    with pytest.raises(ValueError, match=r"model.layers.9"):
        write(checkpoint, tmp_path / "out", modeling.MTPLayer(main.config), layer=9)
    shutil.copytree(checkpoint, tmp_path / "plain")
    tensors = load_file(checkpoint / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.layers.4.")},
              tmp_path / "plain" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no whole MTP layer: \d+ tensors missing, e.g. model.layers.4.eh_proj"):
        modeling.load(tmp_path / "plain")


def test_the_cli_names_what_the_checkpoint_lacks(checkpoint, tmp_path):
    def distill(model):
        return subprocess.run([sys.executable, "-m", "dsinfer.tools.train.distill", "--model", str(model),
                               "--out", str(tmp_path / "out"), "--steps", "1"], capture_output=True, text=True)
    proc = distill(tmp_path)
    assert proc.returncode != 0 and "no model.safetensors" in proc.stderr
    shutil.copytree(checkpoint, tmp_path / "plain")
    save_file({k: v for k, v in load_file(checkpoint / "model.safetensors").items() if "layers.4." not in k},
              tmp_path / "plain" / "model.safetensors", metadata={"format": "pt"})
    proc = distill(tmp_path / "plain")
    assert proc.returncode != 0 and "no whole MTP layer" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
