"""Scripted outputs: the first tokens of every sequence forced, whatever the model says, by raising the script's
token far above the rest of the model's logits (the rest stay finite, so a grammar that refuses the token still
picks among what it allows). The engine runs as it does otherwise: sampler, grammars, the end of reasoning.

Patched per engine: the plain step's logits (runner.run), and with speculative decoding the verified positions'
logits and the MTP layer's drafts (greedy requests, spec_greedy_fast_path off)."""
import torch

LIFT = 60.0  # above the row's best logit: exp(-LIFT) makes any other token out of reach at temperature <= 1


class Script:
    def __init__(self, monkeypatch, engine, tokens: list[int]):
        self.tokens, self.engine = list(tokens), engine
        monkeypatch.setattr(engine.runner, "run", self.wrap_run(engine.runner.run))
        if engine.spec is not None:
            monkeypatch.setattr(engine.spec, "logits", self.wrap_spec_logits(engine.spec.logits))
            monkeypatch.setattr(engine.spec, "propose", self.wrap_propose(engine.spec.propose))

    def token(self, i: int) -> int | None:
        return self.tokens[i] if i < len(self.tokens) else None

    def force(self, row: torch.Tensor, i: int):
        t = self.token(i)
        if t is not None:
            with torch.inference_mode():
                row[t] = row.max() + LIFT

    def wrap_run(self, run):
        def scripted(batch, want):
            logits = run(batch, want)
            for (s, n), lg in zip(batch, logits):
                if lg is not None and s.num_cached + n == len(s):
                    self.force(lg[-1], s.num_outputs)
            return logits
        return scripted

    def wrap_spec_logits(self, logits_of):
        def scripted(batch, hidden, want, ends):
            rows = logits_of(batch, hidden, want, ends)
            for (s, _), lg, end in zip(batch, rows, ends):
                if lg is not None and end:
                    drafts = len(s.draft_ids)
                    for j in range(drafts + 1):
                        self.force(lg[len(lg) - drafts - 1 + j], s.num_outputs + j)
            return rows
        return scripted

    def wrap_propose(self, propose):
        def scripted(jobs):
            rest = []
            for j in jobs:
                t = self.token(j.seq.num_outputs + len(j.seq.draft_ids))
                if t is None:
                    rest.append(j)
                else:
                    j.seq.draft_ids.append(t)
            if rest:
                propose(rest)
        return scripted
