"""What structured outputs cost per decode step: time per output token (TPOT) on the built-in model at 1 and 8
streams, free text against output constrained by a JSON schema, in one run (rounds interleaved, medians), and
how much of a constrained step is the grammar (llguidance's bitmasks applied to the logits, the check of each
sampled token, the matchers' advance).
Each figure is the best of the rounds (which filters out other load on a shared machine), with the median
beside it.

The schema is an object with a long array of short strings (minItems 500), so that no stream finishes early
and every run decodes the same number of steps. The grammar's time is measured in a third run of each round,
so that its timers (a few microseconds a step) do not fall on the constrained TPOT alone; that run's TPOT is
shown too ("timed"). Each run starts after a random pause of up to --jitter seconds: a periodic disturbance
(such as a monitor that sweeps the machine every 0.3 s and preempts a step for milliseconds) would
otherwise fall on the same kind of run round after round, when a free and a constrained run together last about
its period (8 streams), and move the ratio by 10-15%.

    python benchmarks/structured_tpot.py [--steps 64] [--rounds 3] [--mask-first]
        [--no-share-lexer] [--no-lean-refusal]
"""
import argparse
import random
import statistics
import time

import torch

from dsinfer import LLM, SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"}, "words": {
    "type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 500}},
    "required": ["id", "words"]}


def timed(obj, name: str, spent: list[float]):
    """Shadows the method obj.name with a wrapper that adds its seconds to spent[0] (delattr removes it)."""
    original = getattr(obj, name)

    def wrapper(*args):
        start = time.perf_counter()
        out = original(*args)
        spent[0] += time.perf_counter() - start
        return out
    setattr(obj, name, wrapper)


GRAMMAR_WORK = (("grammars", "mask"), ("grammars", "advance_or_refuse"), ("grammars", "best_allowed"),
                (None, "advance_grammar"))


def run(llm: LLM, streams: int, steps: int, constrained: bool, timers: bool = False) -> tuple[float, float]:
    """(seconds per output token per stream, seconds per step in the grammar) over `steps` decode steps. The
    grammar's time (with timers; else 0) is its masks (computed and applied), the check of sampled tokens, and
    its matchers' advance over each chosen token."""
    engine, spent = llm.engine, [0.0]
    so = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=steps + 1, ignore_eos=True, structured_outputs=so)
    llm.add_requests([f"# example {i}\n" for i in range(streams)], params)
    engine.step()  # the prefill and each stream's first token
    owners = [engine.grammars if owner else engine for owner, _ in GRAMMAR_WORK] if timers else []
    for obj, (_, name) in zip(owners, GRAMMAR_WORK):
        timed(obj, name, spent)
    start = time.perf_counter()
    taken = 0
    while engine.has_unfinished():
        engine.step()
        taken += 1
    elapsed = time.perf_counter() - start
    for obj, (_, name) in zip(owners, GRAMMAR_WORK):
        delattr(obj, name)
    assert taken == steps, f"{taken} decode steps, expected {steps}"
    return elapsed / steps, spent[0] / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jitter", type=float, default=0.3, help="longest random pause before each run, seconds")
    ap.add_argument("--mask-first", action="store_true", help="grammar_check_first off: every grammar row masked "
                    "before sampling")
    ap.add_argument("--no-share-lexer", action="store_true", help="grammar_share_lexer off: each sequence's "
                    "matcher built from the grammar, with lexer states of its own")
    ap.add_argument("--no-lean-refusal", action="store_true", help="grammar_lean_refusal off: a refused row's "
                    "mask through fill_masks and its best token through token_argmax")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(grammar_check_first=not args.mask_first, grammar_share_lexer=not args.no_share_lexer,
              grammar_lean_refusal=not args.no_lean_refusal)
    for streams in (1, 8):  # warm-up: kernels, the grammar compile, the llguidance tokenizer
        run(llm, streams, 4, False), run(llm, streams, 4, True)
    print(f"built-in model, {args.steps} decode steps, best (median) of {args.rounds} interleaved rounds, "
          f"threads={torch.get_num_threads()}, grammar_check_first={not args.mask_first}, "
          f"grammar_share_lexer={not args.no_share_lexer}, grammar_lean_refusal={not args.no_lean_refusal}")
    print(f"{'streams':>7} {'free TPOT ms':>17} {'schema TPOT ms':>17} {'slower':>15} {'timed':>6} {'slower':>7} "
          f"{'grammar ms/step':>15}")
    pause = random.Random(0)
    for streams in (1, 8):
        free, schema, timed, grammar = [], [], [], []
        for _ in range(args.rounds):
            time.sleep(pause.uniform(0, args.jitter))
            free.append(run(llm, streams, args.steps, False)[0])
            time.sleep(pause.uniform(0, args.jitter))
            schema.append(run(llm, streams, args.steps, True)[0])
            time.sleep(pause.uniform(0, args.jitter))
            tpot, mask = run(llm, streams, args.steps, True, timers=True)
            timed.append(tpot)
            grammar.append(mask)
        report(streams, free, schema, timed, grammar)


def report(streams: int, free: list[float], schema: list[float], timed: list[float], grammar: list[float]):
    """One line: best (median) TPOT free and constrained, how much slower (best; median), the timed runs' best
    TPOT and how much slower, the grammar's best time per step."""
    f, s, t, g = (min(x) * 1e3 for x in (free, schema, timed, grammar))
    fm, sm = (statistics.median(x) * 1e3 for x in (free, schema))
    print(f"{streams:>7} {f:>7.3f} ({fm:>6.3f}) {s:>7.3f} ({sm:>6.3f}) {s / f - 1:>+6.1%} ({sm / fm - 1:>+6.1%}) "
          f"{t:>6.3f} {t / f - 1:>+7.1%} {g:>15.3f}")


if __name__ == "__main__":
    main()
