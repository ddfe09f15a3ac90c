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
