"""Quality of low-bit weights on the built-in model (or any checkpoint with a tokenizer): held-out perplexity,
top-1 agreement with full precision and mean KL(full || quantized), for int8 and int4 round-to-nearest (on
load), int4 GPTQ and mixed precision (written by `dsinfer quantize`).

    python benchmarks/quant_quality.py [--model DIR] [--eval-tokens 32768] [--samples 128]

Held-out text: the standard-library files the built-in model never trained on (dsinfer.tools.train's split).
Quantized matmuls are run 8 rows at a time, so every one goes through the decode kernel (whose numerics are
what generation sees; whole-prompt scoring would take the prefill path instead). --int8-activations adds int4
and int8 variants with the kernel's int8 activations."""
import argparse
import math
import os
import tempfile
import time

import torch

import dsinfer.layers.linear as linear_mod
from dsinfer import LLM, kernels
from dsinfer.engine.model_runner import score
from dsinfer.tools.quantize.export import QuantizeArgs, quantize_checkpoint
from dsinfer.tools.train.corpus import read, split, stdlib_files


def eval_sequences(tokenizer, tokens: int, length: int) -> list[list[int]]:
    ids = []
    for f in split(stdlib_files())[1]:
        ids += tokenizer.encode(read(f))
        if len(ids) >= tokens:
            break
    return [ids[i:i + length] for i in range(0, min(len(ids), tokens) - length + 1, length)]


def logprobs(llm, seqs) -> list[torch.Tensor]:
    return [score(llm.model, s).float().log_softmax(-1) for s in seqs]


def compare(ref: list[torch.Tensor], test: list[torch.Tensor], seqs) -> dict:
    nll, agree, kl, n = 0.0, 0, 0.0, 0
    for r, t, s in zip(ref, test, seqs):
        target = torch.tensor(s[1:])
        nll -= float(t[:-1].gather(1, target[:, None]).sum())
        agree += int((r.argmax(-1) == t.argmax(-1)).sum())
        kl += float((r.exp() * (r - t)).sum())
        n += len(s) - 1
    positions = sum(len(s) for s in seqs)
    return {"ppl": math.exp(nll / n), "top1": agree / positions, "kl": kl / positions}


def through_decode_kernel(qlinear):
    """qlinear, 8 rows at a time (the decode kernel's batch), whatever the number of rows."""
    return lambda x, w, bias=None, *a: torch.cat([qlinear(part, w, bias, *a) for part in x.split(kernels.MAX_M)])


def variants(model: str, args, tmp: str):
    yield "fp32", lambda: LLM(model, dtype="float32")
    yield "int8 (RTN, per channel)", lambda: LLM(model, dtype="float32", quantization="int8")
    yield "int4 (RTN, g128)", lambda: LLM(model, dtype="float32", quantization="int4")
    for name, qa in (("int4 (GPTQ, g128)", QuantizeArgs("gptq", 4, samples=args.samples, seq_len=args.seq_len)),
                     (f"mixed {args.target_bits} bits (GPTQ)", QuantizeArgs("mixed", 4, target_bits=args.target_bits,
                                                                          samples=args.samples, seq_len=args.seq_len))):
        out = f"{tmp}/{qa.method}"
        yield name, lambda qa=qa, out=out: (quantize_checkpoint(model, out, qa, log=lambda *_: None), LLM(out))[1]
    if args.int8_activations:
        yield "int8 (RTN) + int8 activations", lambda: LLM(model, dtype="float32", quantization="int8")
        yield "int4 (RTN) + int8 activations", lambda: LLM(model, dtype="float32", quantization="int4")
        yield "int4 (GPTQ) + int8 activations", lambda: LLM(f"{tmp}/gptq")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--samples", type=int, default=128, help="calibration sequences for GPTQ and mixed")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--target-bits", type=float, default=4.5)
    p.add_argument("--int8-activations", action="store_true", help="also int4 with the kernel's int8 activations")
    args = p.parse_args()
    linear_mod.qlinear = through_decode_kernel(linear_mod.qlinear)
    from dsinfer import default_model_path
    model = args.model or str(default_model_path())
    ref, seqs, rows = None, None, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in variants(model, args, tmp):
            t0 = time.time()
            os.environ["DSINFER_INT8_ACTIVATIONS"] = "1" if "int8 activations" in name else "0"  # read by LLM()
            llm = make()
            seqs = seqs or eval_sequences(llm.tokenizer, args.eval_tokens, args.length)
            lp = logprobs(llm, seqs)
            ref = ref or lp
            r = compare(ref, lp, seqs)
            rows.append((name, r))
            print(f"{name:28} ppl {r['ppl']:8.3f}  top-1 {100 * r['top1']:6.2f}%  KL {r['kl']:.5f}  "
                  f"({time.time() - t0:.0f} s)", flush=True)
    base = rows[0][1]["ppl"]
    print(f"\nheld-out tokens: {sum(len(s) for s in seqs):,}; perplexity relative to fp32:")
    for name, r in rows:
        print(f"  {name:28} {100 * (r['ppl'] / base - 1):+6.2f}%")


if __name__ == "__main__":
    main()
