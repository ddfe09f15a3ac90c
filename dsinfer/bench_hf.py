"""The same bench figures from Hugging Face transformers' generate (no continuous batching, no prefix cache)."""
import time

import torch

from dsinfer.bench import prefix_ttft, random_requests


class HFPeer:
    def __init__(self, path, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_tokens: int) -> int:
        """Left-padded batch, greedy, exactly max_tokens new tokens each; returns tokens produced."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                  min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        return (out.shape[1] - width) * len(prompts)

    def throughput(self, reqs, batch: int) -> dict:
        """Requests in submission order, `batch` at a time, each batch to its longest output."""
        start, out_tokens = time.perf_counter(), 0
        for i in range(0, len(reqs), batch):
            chunk = reqs[i:i + batch]
            self.generate([p for p, _ in chunk], max(m for _, m in chunk))
            out_tokens += sum(m for _, m in chunk)  # tokens past a request's own length are not counted
        secs = time.perf_counter() - start
        in_tokens = sum(len(p) for p, _ in reqs)
        return {"requests/s": len(reqs) / secs, "output tok/s": out_tokens / secs,
                "total tok/s": (in_tokens + out_tokens) / secs}

    def decode_one_stream(self, prompt_len: int, tokens: int, vocab: int) -> dict:
        prompt = torch.randint(3, vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        start = time.perf_counter()
        self.generate([prompt], 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        self.generate([prompt], tokens)
        return {f"decode tok/s (1 stream, {prompt_len}-token context)":
                (tokens - 1) / (time.perf_counter() - start - first)}


def run(path, dtype, args, vocab: int, max_model_len: int) -> dict[str, dict]:
    peer = HFPeer(path, dtype)
    reqs = random_requests(args.num_requests, args.input_len, args.output_len, vocab, args.seed)
    prefix = min(args.prefix_len, max_model_len - 32)
    return {"throughput": peer.throughput(reqs, args.concurrency),
            "single stream": {**peer.decode_one_stream(args.input_len[0], args.decode_tokens, vocab),
                              **peer.decode_one_stream(prefix, args.decode_tokens, vocab)},
            f"prefix cache ({prefix} tokens)": prefix_ttft(lambda ids: peer.generate([ids], 1), prefix, vocab)}
