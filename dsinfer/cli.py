"""Command line: `dsinfer generate` (streams to the terminal) and `dsinfer chat` (multi-turn)."""
import argparse
import logging
import sys

from dsinfer.models.loader import CheckpointError


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None, help="checkpoint directory (HF layout); default: the built-in model")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsinfer", description="Inference for DeepSeek-architecture models")
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt, printing tokens as they are made")
    add_model_args(gen)
    gen.add_argument("prompt")
    chat = sub.add_parser("chat", help="interactive chat using the checkpoint's chat template")
    add_model_args(chat)
    chat.add_argument("--system", default=None, help="a system message to start the conversation")
    return p


def load(args):
    from dsinfer import LLM, SamplingParams
    llm = LLM(args.model, dtype=args.dtype, device=args.device, seed=args.seed, max_model_len=args.max_model_len)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed)
    return llm, params


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


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        {"generate": generate, "chat": chat}[args.command](args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"dsinfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
