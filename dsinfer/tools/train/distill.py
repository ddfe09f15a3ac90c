"""Self-distillation of the MTP layer: the main model stays as it is (frozen, its tensors rewritten bit for bit) and
the MTP layer learns to predict what the main model will predict next, the quantity speculative decoding accepts.

    python -m dsinfer.tools.train.distill [--model DIR] [--out DIR] [--steps N] [--corpus stdlib|packages|both]

For MTP position i (it sees the main model's hidden h_i and token t_{i+1}, and predicts t_{i+2}) the teacher is
the main model's distribution at position i+1, p = softmax(logits_{i+1}); the loss is KL(p || q_mtp) plus
`data_weight` times the cross-entropy against the corpus token t_{i+2}, which keeps the head grounded."""
import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from dsinfer import DEFAULT_MODEL
from dsinfer.tools.train import card, corpus
from dsinfer.tools.train.__main__ import device
from dsinfer.tools.train.modeling import load, mtp_tensors
from dsinfer.tools.train.trainer import (LoadCounter, TrainConfig, TrainLog, balance, held_out_windows, learning_rate,
                                         sample_batch)


@dataclass(slots=True)
class DistillConfig(TrainConfig):
    data_weight: float = 0.5  # weight of the corpus cross-entropy next to the KL to the main model


def distill_losses(main, mtp, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """batch [B, T+2]: KL to the main model's next distribution, corpus cross-entropy, and per-position agreement
    of the MTP's top token with the main model's (greedy acceptance) and with the corpus."""
    t = batch.shape[1] - 2
    positions = torch.arange(t + 1, device=batch.device).unsqueeze(0)
    with torch.no_grad():
        hidden = main.model(input_ids=batch[:, :t + 1], position_ids=positions).last_hidden_state
        teacher = main.lm_head(hidden[:, 1:]).log_softmax(-1)  # [B, T, V]: position i + 1 predicts t_{i+2}
    student = mtp.predict(main, hidden[:, :t], batch[:, 1:t + 1], positions[:, :t]).log_softmax(-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
    ce = F.nll_loss(student.flatten(0, 1), batch[:, 2:].flatten())
    top = student.argmax(-1)
    return {"kl": kl, "ce": ce, "agree": (top == teacher.argmax(-1)).float().mean(),
            "acc": (top == batch[:, 2:]).float().mean()}


@torch.no_grad()
def evaluate(main, mtp, stream: torch.Tensor, cfg: TrainConfig) -> dict[str, float]:
    """The mean of each of distill_losses' figures over every whole window of the held-out stream."""
    mtp.eval()
    windows = held_out_windows(stream, cfg)
    total = dict.fromkeys(("kl", "ce", "agree", "acc"), 0.0)
    for batch in windows.split(cfg.batch_size):
        for name, value in distill_losses(main, mtp, batch.to(cfg.device)).items():
            total[name] += value.item() * len(batch) / len(windows)
    mtp.train()
    return total


def distill(main, mtp, train_ids: torch.Tensor, val_ids: torch.Tensor, cfg: DistillConfig) -> TrainLog:
    """Trains mtp in place (main frozen) on cfg.device; log.evals holds (step, figures) with step 0 the start."""
    main.to(cfg.device).eval().requires_grad_(False)
    mtp.to(cfg.device).train()
    counter = LoadCounter([mtp.mlp.gate], main.config.n_routed_experts, cfg.device)
    params = [p for p in mtp.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gen, log = torch.Generator().manual_seed(cfg.seed), TrainLog()
    log.evals.append((0, evaluate(main, mtp, val_ids, cfg)))
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="distilling", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        out = distill_losses(main, mtp, sample_batch(train_ids, cfg, gen).to(cfg.device))
        (out["kl"] + cfg.data_weight * out["ce"]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), opt.zero_grad(set_to_none=True)
        balance([mtp.mlp.gate], counter.take(), cfg.bias_update)
        log.losses.append(out["kl"].item()), log.mtp_losses.append(out["ce"].item())
        log.tokens += cfg.batch_size * cfg.seq_len
        bar.set_postfix(kl=f"{out['kl'].item():.3f}", agree=f"{out['agree'].item():.3f}",
                        tok_s=f"{log.tokens / (time.perf_counter() - start):.0f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            log.evals.append((step + 1, evaluate(main, mtp, val_ids, cfg)))
            bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in log.evals[-1][1].items()))
    log.seconds, log.final = time.perf_counter() - start, log.evals[-1][1]
    main.cpu(), mtp.cpu()
    return log


def write(model: Path, out: Path, mtp, layer: int):
    """out: model's files with the MTP layer's tensors replaced (same names and dtypes; the rest bit for bit)."""
    tensors = load_file(model / "model.safetensors")
    new = mtp_tensors(mtp, layer)
    if set(new) != {k for k in tensors if k.startswith(f"model.layers.{layer}.")}:
        raise ValueError(f"{model} does not hold the MTP layer model.layers.{layer} under the expected names")
    tensors |= {k: v.to(tensors[k].dtype).contiguous() for k, v in new.items()}
    work = Path(tempfile.mkdtemp(prefix="dsinfer-distill-"))
    shutil.copytree(model, work, dirs_exist_ok=True)
    save_file(tensors, work / "model.safetensors", metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(work), out)


def run(model: Path, out: Path, cfg: DistillConfig, files=None, threads: int = 2, kind: str = "stdlib"):
    """Distils model's MTP layer on its own tokenizer's encoding of the corpus and writes the result to out with
    the model card's distillation section; returns (section text, log)."""
    torch.set_num_threads(threads)
    main, mtp = load(model)  # first: a checkpoint without a whole MTP layer fails before the corpus is read
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    train_files, val_files = corpus.split(files or corpus.files(kind))
    train_ids, val_ids = corpus.encode(tok, train_files), corpus.encode(tok, val_files)
    log = distill(main, mtp, train_ids, val_ids, cfg)
    write(model, out, mtp, main.config.num_hidden_layers)
    stats = dict(train_files=len(train_files), val_files=len(val_files), train_tokens=len(train_ids),
                 val_tokens=len(val_ids), threads=threads, kind=kind)
    return card.add_distillation(out, cfg=cfg, corpus=stats, log=log), log


def main():
    d = DistillConfig(steps=1500, lr=1e-3, warmup=50, eval_every=500)
    ap = argparse.ArgumentParser(prog="python -m dsinfer.tools.train.distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL), help="the checkpoint to start from")
    ap.add_argument("--out", type=Path, required=True, help="where the distilled checkpoint goes")
    for name in ("steps", "batch_size", "seq_len", "seed", "eval_every"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "data_weight"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus", choices=corpus.CORPORA, default="stdlib")
    ap.add_argument("--device", default="auto", help="auto (cuda where torch sees a GPU, else cpu), cpu, cuda, cuda:N")
    args = ap.parse_args()
    if not (args.model / "model.safetensors").is_file():
        raise SystemExit(f"--model {args.model}: no model.safetensors there")
    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                        eval_every=args.eval_every, lr=args.lr, warmup=d.warmup, data_weight=args.data_weight,
                        device=device(args.device))
    try:
        text, _ = run(args.model, args.out, cfg, threads=args.threads, kind=args.corpus)
    except ValueError as e:  # a checkpoint without a whole MTP layer, a validation split too small
        raise SystemExit(f"distill: {e}") from None
    print(text)


if __name__ == "__main__":
    main()
