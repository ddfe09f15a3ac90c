"""The same bench figures from Hugging Face transformers' generate (no continuous batching, no prefix cache), on
the same workload, measured by the same functions as dsinfer's (dsinfer.tools.bench.measure)."""
import importlib.util
import time

import torch

from dsinfer.tools.bench import measure
from dsinfer.tools.bench.measure import Tick, Workload, no_tick


def require():
    """Called before dsinfer's model loads, so that a missing transformers costs no benchmark run."""
    if importlib.util.find_spec("transformers") is None:
        raise ValueError("--compare transformers needs transformers: pip install 'dsinfer[train]'")


class Stamps:
    """A generate() streamer that keeps the time each token arrived (its first put is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class HFPeer:
    def __init__(self, path, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
        logging.set_verbosity_error()  # its load report lists the MTP layer's weights, which it does not use
        logging.disable_progress_bar()  # the bench's own bars cover loading
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_tokens: int, streamer=None):
        """Left-padded batch, greedy, exactly max_tokens new tokens each."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                            do_sample=False, pad_token_id=0, streamer=streamer)

    def throughput(self, w: Workload, tick: Tick = no_tick) -> dict:
        """Requests in submission order, w.concurrency at a time, each batch to its longest output; tokens past a
        request's own length are not counted."""
        start = time.perf_counter()
        for i in range(0, len(w.requests), w.concurrency):
            chunk = w.requests[i:i + w.concurrency]
            self.generate([p for p, _ in chunk], max(m for _, m in chunk))
            tick(len(chunk))
        out_tokens = sum(m for _, m in w.requests)
        return measure.rates(w.requests, out_tokens, time.perf_counter() - start)

    def decode_one_stream(self, w: Workload, tick: Tick = no_tick) -> dict:
        figures = {}
        for context in w.contexts:
            stamps = Stamps()
            self.generate([measure.seeded_prompt(context, w.vocab)], w.decode_tokens, stamps)
            figures |= measure.decode_figures(context, stamps.times[1:])
            tick(1)
        return figures


def run(path, dtype: torch.dtype, w: Workload, progress) -> dict[str, dict]:
    with progress.phase("transformers: loading, warming up"):
        peer = HFPeer(path, dtype)
        peer.generate([measure.warm_up_prompt(w)], 2)
    throughput, _, single, prefix = measure.section_names(w)
    result = {}
    with progress.phase(f"transformers: {throughput}", len(w.requests)) as tick:
        result[throughput] = peer.throughput(w, tick)
    with progress.phase(f"transformers: {single}", len(w.contexts)) as tick:
        result[single] = peer.decode_one_stream(w, tick)
    with progress.phase(f"transformers: {prefix}", 2) as tick:
        result[prefix] = measure.prefix_ttft(lambda ids: peer.generate([ids], 1), w, tick)
    return result
