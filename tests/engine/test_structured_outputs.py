"""Structured outputs offline: SamplingParams(structured_outputs=StructuredOutputsParams(...)) always gives text
of the schema, regex, choice or grammar, batched with free requests, with n > 1, prefix caching and preemption."""
import json
import re

import jsonschema
import pytest
import torch

from dsinfer import LLM, SamplingParams, StructuredOutputsParams
from dsinfer.engine.sampler import apply_token_masks, unpack_bitmask

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "ok": {"type": "boolean"}, "role": {"enum": ["admin", "user"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3}},
    "required": ["name", "age", "ok", "role", "tags"], "additionalProperties": False}


def constrained(llm, prompts, so, n=1, temperature=0.8, max_tokens=120, **kw):
    sp = SamplingParams(n=n, temperature=temperature, seed=7, max_tokens=max_tokens,
                        structured_outputs=so, **kw)
    return [c for out in llm.generate(prompts, sp, use_tqdm=False) for c in out.outputs]


def test_json_schema_output_always_validates(llms):
    llm = llms("v3", max_model_len=256)
    outs = constrained(llm, ["Bob is", "x = 1"], StructuredOutputsParams(json=PERSON), n=3)
    outs += constrained(llm, ["Bob is"], StructuredOutputsParams(json=json.dumps(PERSON)), temperature=0)
    for c in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)


def test_regex_choice_grammar_and_json_object(llms):
    llm = llms("v3", max_model_len=256)
    for c in constrained(llm, ["a", "b"], StructuredOutputsParams(regex=r"[a-f]{2,6}@(x|y)\.com"), n=2):
        assert re.fullmatch(r"[a-f]{2,6}@(x|y)\.com", c.text) and c.finish_reason == "stop"
    for c in constrained(llm, ["a", "b"], StructuredOutputsParams(choice=["yes", "no", "it \"depends\""]), n=3):
        assert c.text in ("yes", "no", 'it "depends"')
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/'
    gbnf = 'root ::= "[" digit+ "]"\ndigit ::= [0-9]'
    for grammar, pattern in ((lark, r"\(\d{1,3}(\+\d{1,3})*\)"), (gbnf, r"\[\d+\]")):
        for c in constrained(llm, ["a"], StructuredOutputsParams(grammar=grammar), n=2, max_tokens=60):
            assert re.fullmatch(pattern, c.text), c.text
    for c in constrained(llm, ["a", "b"], StructuredOutputsParams(json_object=True, disable_any_whitespace=True)):
        obj = json.loads(c.text)
        assert isinstance(obj, dict) and c.text == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def test_constrained_and_free_requests_share_a_batch(llms):
    """A free request's output is the same alone and batched beside constrained ones; prefix caching on."""
    llm = llms("v3", max_model_len=256)
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["def f(x):"], free, use_tqdm=False)[0].outputs[0].text
    so = SamplingParams(temperature=0, max_tokens=120, structured_outputs=StructuredOutputsParams(json=PERSON))
    outs = llm.generate(["def f(x):", "def f(x):", "def g"], [free, so, so], use_tqdm=False)
    assert outs[0].outputs[0].text == alone
    for out in outs[1:]:
        jsonschema.validate(json.loads(out.outputs[0].text), PERSON)


def test_preempted_sequences_keep_their_grammar_state(ckpts):
    """A cache too small for all samples preempts some; recomputed, they continue their grammar where it was."""
    llm = LLM(ckpts["v3"], max_model_len=200, kv_cache_memory=14 * 16 * 4 * 48 * 4)  # 14 blocks of 16 tokens
    outs = constrained(llm, ["Bob is " * 10], StructuredOutputsParams(json=PERSON), n=4, max_tokens=150)
    assert llm.engine.scheduler.num_preemptions > 0
    for c in outs:
        jsonschema.validate(json.loads(c.text), PERSON)


@pytest.mark.parametrize("so,field", [
    (dict(json={"type": "objectx"}), "structured_outputs.json"),
    (dict(json="{not json"), "structured_outputs.json"),
    (dict(regex="a(b"), "structured_outputs.regex"),
    (dict(grammar="start: undefined_rule"), "structured_outputs.grammar"),
])
def test_invalid_constraints_name_the_field(llms, so, field):
    llm = llms("v3", max_model_len=256)
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.generate(["a"], SamplingParams(structured_outputs=StructuredOutputsParams(**so)), use_tqdm=False)


def test_constraint_needs_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])


@pytest.mark.parametrize("kernel", [False, True])
def test_token_masks_against_a_plain_loop(llms, kernel):
    """The batched bitmask unpacking and masking (torch, or the C kernel) against a per-token Python reference;
    a row the other rules emptied takes the grammar's tokens."""
    g = torch.Generator().manual_seed(0)
    vocab, words = 70, 3
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, words), generator=g, dtype=torch.int64).to(torch.int32)
    allowed = unpack_bitmask(bitmask, vocab)
    for r in range(2):
        for t in range(vocab):
            assert bool(allowed[r, t]) == bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1)
    llm = llms("v3", max_model_len=256)
    llm.add_requests(["a", "b", "c"], SamplingParams(min_tokens=2))
    seqs = list(llm.engine.scheduler.waiting)[-3:]
    logits = torch.randn(3, vocab, generator=g)
    logits[2] = float("-inf")  # as if min_tokens and other rules had banned every token
    out = apply_token_masks(logits.clone(), seqs, [0, 2], bitmask, kernel=kernel)
    assert torch.equal(out[1], logits[1])
    assert torch.equal(torch.isfinite(out[[0, 2]]), allowed)
    assert torch.equal(out[0][allowed[0]], logits[0][allowed[0]]) and bool((out[2][allowed[1]] == 0).all())
    for rid in list(llm.engine.requests):
        llm.engine.abort(rid)


def test_check_first_draws_what_masking_first_draws(llms):
    """grammar_check_first (sample unmasked, mask only a row whose grammar refuses its token) gives the same
    tokens as masking every grammar row first: seeded and shared-generator sampling, greedy, top-p and
    min_tokens (those two always masked first), beside a free request. Both paths are taken."""
    so = StructuredOutputsParams(json=PERSON)
    params = [SamplingParams(temperature=0.8, seed=3, max_tokens=80, structured_outputs=so),
              SamplingParams(temperature=1.0, max_tokens=80, structured_outputs=so),
              SamplingParams(temperature=0, max_tokens=80, structured_outputs=so),
              SamplingParams(temperature=0.9, top_p=0.9, seed=4, max_tokens=80, structured_outputs=so),
              SamplingParams(temperature=0.7, seed=5, min_tokens=4, max_tokens=80, structured_outputs=so),
              SamplingParams(temperature=0.8, seed=6, max_tokens=20)]
    prompts = ["Bob is", "x = 1", "Bob is", "a", "b", "c"]
    outs = {}
    for check_first in (False, True):
        llm = llms("v3", max_model_len=256, grammar_check_first=check_first)
        llm.engine.generator.manual_seed(11)
        calls = {"advanced": 0, "refused": 0}
        advance = llm.engine.grammars.advance_or_refuse

        def counted(seqs, rows, tokens):
            refused = advance(seqs, rows, tokens)
            calls["advanced"] += len(rows) - len(refused)
            calls["refused"] += len(refused)
            return refused
        llm.engine.grammars.advance_or_refuse = counted
        try:
            outs[check_first] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            del llm.engine.grammars.advance_or_refuse
        assert (calls["advanced"] > 0 and calls["refused"] > 0) == check_first, calls
    for masked_first, checked_first in zip(outs[False], outs[True]):
        assert checked_first.token_ids == masked_first.token_ids
    for c in outs[True][:5]:
        jsonschema.validate(json.loads(c.text), PERSON)


def test_shared_lexer_gives_what_fresh_matchers_give(llms, monkeypatch):
    """grammar_share_lexer (each sequence's matcher a copy of its grammar's template, sharing the lexer states
    built so far) gives the tokens of matchers each built from the grammar: greedy, seeded and n > 1 beside a
    free request, twice (the second time from a warm template), and across a template's renewal. Copies are
    independent: sequences of one grammar write different valid texts."""
    import dsinfer.engine.grammar as grammar
    so = StructuredOutputsParams(json=PERSON)
    params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=so),
              SamplingParams(n=3, temperature=0.9, seed=5, max_tokens=80, structured_outputs=so),
              SamplingParams(temperature=0.8, seed=6, max_tokens=20)]
    prompts = ["Bob is", "x = 1", "c"]
    monkeypatch.setattr(grammar, "FORKS_PER_TEMPLATE", 5)  # the second round starts a fresh template
    outs = {}
    for share in (False, True):
        llm = llms("v3", max_model_len=256, grammar_share_lexer=share)
        outs[share] = [[c.token_ids for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]
                       for _ in range(2)]
        assert bool(llm.engine.grammars.templates) == share
    assert outs[True] == outs[False]
    texts = [LLM.get_tokenizer(llms("v3", max_model_len=256)).decode(ids) for ids in outs[True][0][:4]]
    assert len(set(texts)) > 1
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_built_in_model_writes_valid_json():
    """The weak built-in model with a schema of free strings and numbers, greedy (sampled, a free string can
    outrun any budget: test_json_schema_output_always_validates bounds its strings)."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "age", "tags"]}
    llm = LLM(max_model_len=512)
    outs = constrained(llm, ["Tell me about Bob.", "import json", "# a person\n"],
                       StructuredOutputsParams(json=schema), temperature=0, max_tokens=250)
    for c in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)


def test_lean_refusal_gives_the_plain_paths_tokens(llms):
    """grammar_lean_refusal (a refused row's mask and best token through RowArgmax's buffers) gives the tokens of
    fill_masks and token_argmax: greedy, seeded, n > 1 and a shared generator beside a free request; the lean
    path is taken when on, never when off."""
    so = StructuredOutputsParams(json=PERSON)
    params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=so),
              SamplingParams(n=2, temperature=0.9, seed=5, max_tokens=80, structured_outputs=so),
              SamplingParams(temperature=1.0, max_tokens=80, structured_outputs=so),
              SamplingParams(temperature=0.8, seed=6, max_tokens=20)]
    prompts = ["Bob is", "x = 1", "a", "c"]
    outs, lean_rows = {}, {}
    for lean in (False, True):
        llm = llms("v3", max_model_len=256, **({} if lean else {"grammar_lean_refusal": False}))
        llm.engine.generator.manual_seed(11)
        lean_rows[lean] = 0
        plain = llm.engine.grammars.best_allowed_lean

        def counted(scores, seqs, rows):
            lean_rows[lean] += len(rows)
            return plain(scores, seqs, rows)
        llm.engine.grammars.best_allowed_lean = counted
        try:
            outs[lean] = [c.token_ids for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]
        finally:
            del llm.engine.grammars.best_allowed_lean
    assert lean_rows[False] == 0 and lean_rows[True] > 0, lean_rows
    assert outs[True] == outs[False]
    for ids in outs[True][:4]:
        jsonschema.validate(json.loads(LLM.get_tokenizer(llm).decode(ids)), PERSON)
