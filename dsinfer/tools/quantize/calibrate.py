"""Calibration: run text through the full-precision model and collect, for every weight matrix, the Hessian
of its inputs H = sum of x x^T over the tokens that reached it (per routed expert, the tokens routed to it)."""

import torch

from dsinfer.engine.model_runner import score
from dsinfer.layers.linear import Matmul
from dsinfer.tools.train.corpus import read, split, stdlib_files

PRIOR_TOKENS = 16  # weight, in tokens, of the pooled prior every expert's Hessian is blended with


class HessianRecorder:
    """Accumulates x^T x per weight (keyed by the weight's storage address) for every call of linear()."""

    def __init__(self):
        self.h: dict[int, torch.Tensor] = {}
        self.count: dict[int, int] = {}

    def __call__(self, x: torch.Tensor, w):
        if not isinstance(w, torch.Tensor):
            return
        x = x.reshape(-1, x.shape[-1]).float()
        key = w.data_ptr()
        if key not in self.h:
            self.h[key] = torch.zeros(x.shape[1], x.shape[1])
            self.count[key] = 0
        self.h[key].addmm_(x.t(), x)
        self.count[key] += x.shape[0]

    def hessian(self, w: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(H, tokens) for one matrix; zeros when no calibration token reached it."""
        key = w.data_ptr()
        if key not in self.h:
            return torch.zeros(w.shape[-1], w.shape[-1]), 0
        return self.h[key], self.count[key]

    def expert_hessians(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        """Each expert's H blended with the mean H of all the layer's experts, PRIOR_TOKENS tokens' worth:
        experts that calibration rarely reaches still get a full-rank Hessian shaped like their inputs."""
        own = [self.hessian(stacked[e]) for e in range(stacked.shape[0])]
        total = sum(c for _, c in own)
        prior = sum(h for h, _ in own) / max(total, 1)
        return [(h + PRIOR_TOKENS * prior) / (c + PRIOR_TOKENS) for h, c in own]


@torch.inference_mode()
def record(model, sequences: list[list[int]]) -> HessianRecorder:
    """Runs the sequences through the model with every layer's matmul recording its inputs (the model should be
    built without the CPU kernels, whose fused layers bypass the matmuls)."""
    recorder = HessianRecorder()
    owners = [m for m in model.modules() if isinstance(getattr(m, "matmul", None), Matmul)]
    for m in owners:
        m.matmul = Recording(m.matmul, recorder)
    try:
        for ids in sequences:
            score(model, ids)
    finally:
        for m in owners:
            m.matmul = m.matmul.inner
    return recorder


class Recording:
    """A layer's Matmul that shows each (x, w) to the recorder first."""

    def __init__(self, inner: Matmul, recorder: HessianRecorder):
        self.inner, self.recorder = inner, recorder

    def __call__(self, x, w, bias=None):
        self.recorder(x, w)
        return self.inner(x, w, bias)


def default_calibration_text(limit_chars: int = 400_000) -> str:
    """Offline default: every 7th training-side source file of the Python standard library this interpreter
    ships with (the trainer's split: the built-in model's held-out files are never used)."""
    text, size = [], 0
    for f in split(stdlib_files())[0][::7]:
        text.append(read(f))
        size += len(text[-1])
        if size >= limit_chars:
            break
    return "\n".join(text)


def calibration_sequences(tokenizer, text: str, num: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(text)
    if len(ids) < length:
        raise ValueError(f"calibration text has {len(ids)} tokens; at least {length} are needed")
    step = max(length, (len(ids) - length) // max(num - 1, 1))
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, step)][:num]
