"""What transformers computes on the same checkpoint: the ground truth for exactness tests."""
import functools

import torch


@functools.lru_cache(maxsize=8)
def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs(path, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab] log-probabilities of the next token at every position."""
    return hf_model(str(path))(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


@torch.no_grad()
def hf_greedy(path, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens through transformers' own KV cache, one token per step."""
    from transformers import DynamicCache
    model = hf_model(str(path))
    cache = DynamicCache(config=model.config)
    ids, out = torch.tensor([prompt]), []
    for _ in range(n):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
        out.append(int(logits.argmax()))
        ids = torch.tensor([[out[-1]]])
    return out


def fp8_block_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek's FP8 block dequantization written from its definition, independently of dsinfer's:
    W[i, j] = q[i, j] * scale_inv[i // bo, j // bi], tile by tile; the last tile of a row or column holds what is
    left of the weight when its size is not a multiple of the block."""
    rows, cols = q.shape
    bo, bi = block
    assert tuple(scale_inv.shape) == ((rows + bo - 1) // bo, (cols + bi - 1) // bi)
    out = torch.empty(rows, cols, dtype=torch.float32)
    for ti in range(scale_inv.shape[0]):
        for tj in range(scale_inv.shape[1]):
            r, c = slice(ti * bo, min(ti * bo + bo, rows)), slice(tj * bi, min(tj * bi + bi, cols))
            out[r, c] = q[r, c].to(torch.float32) * scale_inv[ti, tj].item()
    return out
