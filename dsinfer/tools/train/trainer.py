"""The training loop: next-token loss plus DeepSeek-V3's MTP loss, AdamW with warmup and cosine decay, and
auxiliary-loss-free load balancing (each router's bias moves against its expert's load after every step)."""
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass(slots=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    mtp_weight: float = 0.3
    bias_update: float = 1e-3
    eval_every: int = 500
    seed: int = 0
    device: str = "cpu"  # where the model trains (cuda: a GPU); the checkpoint is written from the CPU either way


@dataclass(slots=True)
class TrainLog:
    losses: list = field(default_factory=list)
    mtp_losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    final: dict = field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0


class LoadCounter:
    """Counts tokens per routed expert at every MoE router (forward hooks on the gates)."""

    def __init__(self, gates: list, num_experts: int, device: str = "cpu"):
        self.gates, self.counts = gates, torch.zeros(len(gates), num_experts, dtype=torch.long, device=device)
        for i, gate in enumerate(gates):
            gate.register_forward_hook(lambda mod, args, out, i=i: self.add(i, out[2]))

    def add(self, i: int, topk_indices: torch.Tensor):
        self.counts[i] += torch.bincount(topk_indices.flatten(), minlength=self.counts.shape[1])

    def take(self) -> torch.Tensor:
        counts, self.counts = self.counts, torch.zeros_like(self.counts)
        return counts


def moe_gates(main, mtp) -> list:
    layers = list(main.model.layers) + [mtp]
    return [layer.mlp.gate for layer in layers if hasattr(layer.mlp, "gate")]


@torch.no_grad()
def balance(gates: list, counts: torch.Tensor, step: float):
    """Aux-loss-free balancing: b_i += step * sign(mean load - load_i); the bias only affects selection."""
    for gate, load in zip(gates, counts.float()):
        gate.e_score_correction_bias += step * torch.sign(load.mean() - load)


def losses(main, mtp, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch [B, T+2]: the main model predicts t_{i+1} from t_{<=i}; MTP predicts t_{i+2} from h_i and t_{i+1}."""
    t = batch.shape[1] - 2
    inputs, positions = batch[:, :t], torch.arange(t, device=batch.device).unsqueeze(0)
    hidden = main.model(input_ids=inputs, position_ids=positions).last_hidden_state
    logits = main.lm_head(hidden)
    mtp_logits = mtp.predict(main, hidden, batch[:, 1:t + 1], positions)
    main_loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:t + 1].flatten())
    mtp_loss = F.cross_entropy(mtp_logits.flatten(0, 1), batch[:, 2:].flatten())
    return main_loss, mtp_loss, logits, mtp_logits


def sample_batch(stream: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - cfg.seq_len - 2, (cfg.batch_size,), generator=gen)
    return torch.stack([stream[s:s + cfg.seq_len + 2] for s in starts.tolist()])


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def held_out_windows(stream: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Every whole window of seq_len + 2 tokens of the held-out stream, [windows, seq_len + 2]."""
    width = cfg.seq_len + 2
    windows = stream[: len(stream) // width * width].view(-1, width)
    if not len(windows):
        raise ValueError(f"the validation split has fewer than {width} tokens; use more files or a shorter seq_len")
    return windows


@torch.no_grad()
def evaluate(main, mtp, stream: torch.Tensor, cfg: TrainConfig, counter: LoadCounter | None = None) -> dict:
    """Loss, perplexity and top-1 accuracy of both heads over every whole window of the held-out stream."""
    main.eval(), mtp.eval()
    windows = held_out_windows(stream, cfg)
    if counter:
        counter.take()
    total = {"loss": 0.0, "mtp_loss": 0.0, "acc": 0.0, "mtp_acc": 0.0}
    for batch in windows.split(cfg.batch_size):
        batch = batch.to(cfg.device)
        main_loss, mtp_loss, logits, mtp_logits = losses(main, mtp, batch)
        n = len(batch) / len(windows)
        total["loss"] += main_loss.item() * n
        total["mtp_loss"] += mtp_loss.item() * n
        total["acc"] += (logits.argmax(-1) == batch[:, 1:-1]).float().mean().item() * n
        total["mtp_acc"] += (mtp_logits.argmax(-1) == batch[:, 2:]).float().mean().item() * n
    main.train(), mtp.train()
    total["ppl"], total["tokens"] = math.exp(total["loss"]), windows[:, 1:-1].numel()
    if counter:
        total["expert_counts"] = counter.take().cpu()
    return total


def train(main, mtp, train_ids: torch.Tensor, val_ids: torch.Tensor, cfg: TrainConfig) -> TrainLog:
    """Trains main and mtp in place on cfg.device (batches are drawn on the CPU and moved there); both are back
    on the CPU when it returns."""
    main.to(cfg.device), mtp.to(cfg.device)
    gates = moe_gates(main, mtp)
    counter = LoadCounter(gates, main.config.n_routed_experts, cfg.device)
    params = list(main.parameters()) + list(mtp.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gen, log, start = torch.Generator().manual_seed(cfg.seed), TrainLog(), time.perf_counter()
    main.train(), mtp.train()
    bar = tqdm(range(cfg.steps), desc="training", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        main_loss, mtp_loss, _, _ = losses(main, mtp, sample_batch(train_ids, cfg, gen).to(cfg.device))
        (main_loss + cfg.mtp_weight * mtp_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), opt.zero_grad(set_to_none=True)
        balance(gates, counter.take(), cfg.bias_update)
        log.losses.append(main_loss.item()), log.mtp_losses.append(mtp_loss.item())
        log.tokens += cfg.batch_size * cfg.seq_len
        bar.set_postfix(loss=f"{main_loss.item():.3f}", mtp=f"{mtp_loss.item():.3f}",
                        tok_s=f"{log.tokens / (time.perf_counter() - start):.0f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            log.final = evaluate(main, mtp, val_ids, cfg, counter)
            result = log.final
            log.evals.append((step + 1, result["loss"]))
            bar.write(f"step {step + 1}: validation loss {result['loss']:.3f} (ppl {result['ppl']:.2f}), "
                      f"mtp accuracy {result['mtp_acc']:.3f}")
    log.seconds = time.perf_counter() - start
    main.cpu(), mtp.cpu()
    return log
