"""Run by the torchrun test on every rank: greedy tokens and prompt logprobs of PROMPTS as JSON from rank 0."""
import json
import sys

from dsinfer import LLM
from tests.engine.test_parallel import ENGINE, results

if __name__ == "__main__":
    llm = LLM(sys.argv[1], tensor_parallel_size=2, **ENGINE)  # ranks other than 0 follow rank 0 inside, then exit
    print(json.dumps(results(llm)))
    llm.close()
