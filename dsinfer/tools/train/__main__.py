"""python -m dsinfer.tools.train --out DIR [--steps N] [--corpus stdlib|packages|both] [--device auto|cpu|cuda]:
tokenizer, model, MTP, model card, all seeded."""
import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from dsinfer import DEFAULT_MODEL
from dsinfer.tools.train import card, corpus
from dsinfer.tools.train.modeling import Arch, build, save
from dsinfer.tools.train.trainer import TrainConfig, train


def run(out: Path, arch: Arch, cfg: TrainConfig, files=None, threads: int = 2, with_card: bool = True,
        kind: str = "stdlib"):
    """files: the corpus (None: corpus.files(kind)); kind names it on the model card."""
    torch.set_num_threads(threads)
    train_files, val_files = corpus.split(files or corpus.files(kind))
    work = Path(tempfile.mkdtemp(prefix="dsinfer-train-"))
    tok = corpus.train_tokenizer(train_files, arch.vocab_size, work)
    train_ids, val_ids = corpus.encode(tok, train_files), corpus.encode(tok, val_files)
    print(f"corpus: {len(train_files)} training files ({len(train_ids):,} tokens), "
          f"{len(val_files)} validation files ({len(val_ids):,} tokens)")
    main, mtp = build(arch, cfg.seed)
    log = train(main, mtp, train_ids, val_ids, cfg)
    save(main, mtp, work)
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(work), out)
    stats = dict(train_files=len(train_files), val_files=len(val_files), train_tokens=len(train_ids),
                 val_tokens=len(val_ids), threads=threads, kind=kind)
    params = dict(main=sum(p.numel() for p in main.parameters()), mtp=sum(p.numel() for p in mtp.parameters()))
    samples = card.completions(out) if with_card else []
    return card.write(out, arch=arch, cfg=cfg, corpus=stats, log=log, params=params, samples=samples), log


def device(name: str) -> str:
    """--device: auto picks cuda where torch sees a GPU; a CUDA device without one is an error naming it."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"--device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch sees no CUDA device here")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: use auto, cpu or cuda")
    return name


def main():
    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="python -m dsinfer.tools.train", description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus", choices=corpus.CORPORA, default="stdlib",
                    help="the standard library's sources, the installed packages' (site-packages), or both")
    ap.add_argument("--device", default="auto", help="auto (cuda where torch sees a GPU, else cpu), cpu, cuda, cuda:N")
    args = ap.parse_args()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                      device=device(args.device))
    text, _ = run(args.out, Arch(), cfg, threads=args.threads, kind=args.corpus)
    print(text)


if __name__ == "__main__":
    main()
