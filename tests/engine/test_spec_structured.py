"""Structured outputs and speculative decoding together: grammar requests take one masked token a step (they do
not draft), free requests in the same batch keep speculating, and every output follows its schema."""
import json

import jsonschema

from dsinfer import LLM, SamplingParams, StructuredOutputsParams
from tests.engine.test_structured_outputs import PERSON


def test_schema_requests_validate_beside_speculating_ones(ckpts):
    llm = LLM(ckpts["v3-mtp"], max_model_len=256, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    grammar = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=120,
                             structured_outputs=StructuredOutputsParams(json=PERSON))
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(["Bob is", "x = 1", "def f", "import"], [grammar, grammar, free, free], use_tqdm=False)
    for c in (c for out in outs[:2] for c in out.outputs):
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
    assert all(len(out.outputs[0].token_ids) == 24 for out in outs[2:])
    assert sum(llm.engine.spec.stats.drafted) > 0  # the free requests did speculate
