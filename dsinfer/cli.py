"""Command line: `dsinfer generate` (streams to the terminal), `dsinfer chat` (multi-turn), `dsinfer bench`,
`dsinfer serve`, `dsinfer quantize`. Bad arguments fail in the parser, before any model loads: one line on
stderr, exit status 2."""
import argparse
import json
import logging
import sys
from pathlib import Path

from dsinfer.engine.config import DTYPES, check_speculative_config, resolve_device
from dsinfer.layers.block_sparse import SparseConfig
from dsinfer.layers.kv_format import KV_CACHE_DTYPES
from dsinfer.models.loader import CheckpointError, read_config


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage block), exit status 2 as argparse's."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def checked(kind, ok, rule: str):
    """An argparse type: `kind` (int or float) parsed from the text, refused unless ok(value)."""
    def parse(text: str):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


COUNT = checked(int, lambda v: v >= 1, ">= 1")
SIZE = checked(int, lambda v: v >= 0, ">= 0")
PORT = checked(int, lambda v: 0 <= v <= 65535, "in 0..65535 (0: any free port)")
SIMILARITY = checked(float, lambda v: 0 < v <= 1, "in (0, 1]")
CONTEXT = checked(int, lambda v: v >= 2, ">= 2")


def model_dir(text: str) -> str:
    """--model: a directory with a readable config.json (the weights load later)."""
    try:
        read_config(text)
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def device(text: str) -> str:
    try:
        resolve_device(text)
    except (ValueError, RuntimeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def speculative_config(text: str) -> dict:
    try:
        return check_speculative_config(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def output_file(text: str) -> str:
    """A file to write at the end of a run: its directory must exist now, not after the run."""
    if not Path(text).parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(Path(text).parent)!r} does not exist")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    return text


def sparse_json(text: str) -> dict:
    try:
        d = json.loads(text)
        SparseConfig.from_dict(d)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise argparse.ArgumentTypeError(f"--sparse-attention {text!r}: {e}") from None
    return d


def add_load_args(p: argparse.ArgumentParser):
    """What every command that loads a model takes."""
    p.add_argument("--model", type=model_dir, default=None,
                   help="checkpoint directory (HF layout); default: the built-in model")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, fp32 on other CPUs")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N")
    add_quant_arg(p)
    p.add_argument("--max-model-len", type=CONTEXT, default=None,
                   help="longest sequence in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="the latent cache's format: auto (the model's dtype), float32, bfloat16, fp8 (656 bytes "
                        "a token and layer at DeepSeek's shapes)")
    p.add_argument("--sparse-attention", type=sparse_json, default=None, metavar="JSON",
                   help='training-free sparse attention for models without an indexer, as JSON: '
                        '{"sink": 16, "window": 256, "topk_blocks": 16} (each query keeps the first sink tokens, '
                        'the last window tokens and the topk_blocks best-scoring cache blocks of the rest); default off')
    p.add_argument("--prefix-cache-dir", default=None,
                   help="a directory where prefix-cache blocks evicted from memory are kept, across restarts")
    p.add_argument("--prefix-cache-dir-bytes", type=COUNT, default=None, help="its size limit (default 10 GiB)")
    p.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                   help='speculative decoding with the checkpoint\'s MTP layer: \'{"method": "mtp", '
                        '"num_speculative_tokens": 2}\'')
    p.add_argument("--tensor-parallel-size", "-tp", type=COUNT, default=1,
                   help="split the model over N ranks: N processes on this machine, or torchrun's N ranks")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: each rank holds whole routed experts, not a slice of each")


def load_options(args) -> dict:
    """The LLM options every command that loads a model takes from its flags."""
    return dict(dtype=args.dtype, device=args.device, seed=args.seed, max_model_len=args.max_model_len,
                quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                prefix_cache_dir=args.prefix_cache_dir, prefix_cache_dir_bytes=args.prefix_cache_dir_bytes,
                speculative_config=args.speculative_config, sparse_attention=args.sparse_attention,
                tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel)


def add_model_args(p: argparse.ArgumentParser):
    """Sampling flags are checked by SamplingParams, before the model loads (see load)."""
    add_load_args(p)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]")
    p.add_argument("--top-k", type=int, default=-1, help="-1: no limit")
    p.add_argument("--min-p", type=float, default=0.0, help="in [0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 is none")


def add_quant_arg(p: argparse.ArgumentParser):
    p.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="quantize weights on load (int8 per channel, int4 in groups of 128); GPTQ checkpoints "
                        "load quantized without it")


def add_quantize_args(p: argparse.ArgumentParser):
    p.add_argument("src", help="full-precision (or fp8) checkpoint directory")
    p.add_argument("dst", help="where to write the GPTQ-layout checkpoint")
    p.add_argument("--method", choices=["gptq", "rtn", "mixed"], default="gptq")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--group-size", type=int, default=128, help="-1: one group per output row")
    p.add_argument("--calibration", default="default",
                   help="a text file, or 'default' (Python standard-library sources, offline)")
    p.add_argument("--target-bits", type=float, default=4.5, help="--method mixed: bits per weight, scales included")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, a fraction of the mean Hessian diagonal")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ columns in natural order")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="dsinfer", description="Inference for DeepSeek-architecture models")
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt, printing tokens as they are made")
    add_model_args(gen)
    gen.add_argument("prompt")
    chat = sub.add_parser("chat", help="interactive chat using the checkpoint's chat template")
    add_model_args(chat)
    chat.add_argument("--system", default=None, help="a system message to start the conversation")
    add_bench_args(sub.add_parser("bench", help="throughput, latency, decode and prefix-cache figures"))
    add_serve_args(sub.add_parser("serve", help="OpenAI-compatible HTTP server"))
    add_quantize_args(sub.add_parser("quantize", help="write an int4/int8 GPTQ-layout checkpoint (GPTQ, RTN or mixed)"))
    return p


def add_serve_args(p: argparse.ArgumentParser):
    add_load_args(p)
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=PORT, default=8000, help="0 picks a free port (the log says which)")
    p.add_argument("--max-num-seqs", type=COUNT, default=64)
    p.add_argument("--kv-cache-memory", type=COUNT, default=None, help="bytes for the latent cache")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or set DSINFER_API_KEY)")
    p.add_argument("--max-waiting", type=COUNT, default=256, help="queued sequences past which requests get 429")
    p.add_argument("--max-body-bytes", type=COUNT, default=1 << 20)
    p.add_argument("--max-tokens-cap", type=COUNT, default=4096)
    p.add_argument("--response-cache-size", type=SIZE, default=512, help="0 turns the response cache off")
    p.add_argument("--semantic-cache-threshold", type=SIMILARITY, default=None,
                   help="answer near-duplicate deterministic prompts from the cache (cosine similarity, e.g. 0.95)")
    p.add_argument("--reasoning-parser", choices=["deepseek_r1"], default=None,
                   help="split <think>...</think> off chat answers into reasoning_content; structured outputs "
                        "and forced tool calls start after </think>")


def length_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def add_bench_args(p: argparse.ArgumentParser):
    add_load_args(p)
    p.add_argument("--num-requests", type=COUNT, default=32)
    p.add_argument("--input-len", type=length_range, default=(32, 256), help="LO:HI prompt tokens")
    p.add_argument("--output-len", type=length_range, default=(16, 128), help="LO:HI generated tokens")
    p.add_argument("--concurrency", type=COUNT, default=8, help="requests in flight for the latency figures")
    p.add_argument("--decode-tokens", type=checked(int, lambda v: v >= 2, ">= 2"), default=64,
                   help="tokens for the single-stream decode figure")
    p.add_argument("--prefix-len", type=COUNT, default=2000, help="shared prefix for the prefix-cache figure")
    p.add_argument("--max-num-seqs", type=COUNT, default=256)
    p.add_argument("--max-num-batched-tokens", type=COUNT, default=None)
    p.add_argument("--kv-cache-memory", type=COUNT, default=None, help="bytes for the latent cache")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--threads", type=COUNT, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compare", choices=["transformers"], default=None,
                   help="also run Hugging Face transformers' generate on the same model and prompts "
                        "(needs transformers)")
    p.add_argument("--json", type=output_file, default=None, metavar="PATH",
                   help="write the raw results to PATH as JSON: every figure, the settings, the CPU model and its "
                        "ISA flags (avx2, avx512f, avx512_bf16, amx...), versions and the date")
    p.add_argument("--plot", type=output_file, default=None, metavar="PATH",
                   help="draw the figures to PATH as a PNG bar chart, dsinfer beside transformers with --compare "
                        "(needs matplotlib: pip install 'dsinfer[plot]')")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (they are drawn on stderr, and only when stderr is a terminal)")


def load(args):
    """The sampling flags become SamplingParams first, so that a bad one fails before the model loads."""
    from dsinfer import LLM, SamplingParams
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed)
    return LLM(args.model, **load_options(args)), params


def stream_text(llm, prompt, params) -> str:
    """Prints the completion as it grows; returns the whole text."""
    shown = ""
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    return shown


def generate(args):
    llm, params = load(args)
    stream_text(llm, args.prompt, params)
    print()


def chat(args):
    llm, params = load(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = stream_text(llm, llm.chat_prompt(history), params)
        print()
        history.append({"role": "assistant", "content": reply})


def bench(args):
    from dsinfer.tools.bench.command import run
    run(args, load_options(args))


def serve(args):
    import os
    import signal

    import uvicorn

    from dsinfer import LLM
    from dsinfer.engine.async_engine import AsyncLLM
    from dsinfer.server.app import ServerConfig, build_app
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory,
              reasoning_parser=args.reasoning_parser, **load_options(args))
    name = args.served_model_name or (Path(args.model).name if args.model else "dsinfer-default")
    cfg = ServerConfig(name, args.api_key or os.environ.get("DSINFER_API_KEY"), args.max_waiting,
                       args.max_body_bytes, args.max_tokens_cap, args.response_cache_size,
                       args.semantic_cache_threshold)
    # uvicorn stops taking requests on SIGTERM/SIGINT, lets the ones in flight finish (up to 30 s), then
    # re-raises the signal; this handler turns SIGTERM's re-raise into a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(build_app(AsyncLLM(llm), cfg), host=args.host, port=args.port, timeout_graceful_shutdown=30)


def quantize(args):
    from dsinfer.tools.quantize.export import QuantizeArgs, quantize_checkpoint
    qargs = QuantizeArgs(args.method, args.bits, args.group_size, args.calibration, args.target_bits, args.samples,
                         args.seq_len, args.damp, not args.no_act_order)
    modules = quantize_checkpoint(args.src, args.dst, qargs)
    counts = {b: sum(1 for v in modules.values() if v == b) for b in (4, 8, 16)}
    print(f"wrote {args.dst}: {counts[4]} matrices in 4 bits, {counts[8]} in 8, {counts[16]} kept in 16")


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse's errors (status 2, one line; see Parser) and --help (status 0)
        return e.code
    try:
        {"generate": generate, "chat": chat, "bench": bench, "serve": serve, "quantize": quantize}[args.command](args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"dsinfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
