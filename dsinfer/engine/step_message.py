"""A tensor-parallel step's inputs as one flat int64 tensor, for rank 0 to broadcast to the other ranks in one
collective without pickling (parallel_group.Channel.send_words): the token ids and positions, the
AttentionMetadata, and the rows of the final hidden states whose logits the step wants (None: no logits).

Layout: T, B, W, num_prefills, num_prefill_tokens, R (-1: no logits), query_lens [B], context_lens [B],
input_ids [T], positions [T], slot_mapping [T], token_seq [T], gather_index [B, W] row by row, rows [R]."""
import torch

from dsinfer.layers.attention import AttentionMetadata

HEAD = 6


def pack(input_ids, positions, meta: AttentionMetadata, rows: torch.Tensor | None) -> torch.Tensor:
    """The step as one int64 tensor (on the CPU)."""
    t, (b, w) = input_ids.shape[0], meta.gather_index.shape
    r = -1 if rows is None else rows.shape[0]
    head = torch.tensor([t, b, w, meta.num_prefills, meta.num_prefill_tokens, r, *meta.query_lens,
                         *meta.context_lens])
    parts = [head, input_ids, positions, meta.slot_mapping, meta.token_seq, meta.gather_index.flatten()]
    return torch.cat([p.cpu().long() for p in parts + ([] if rows is None else [rows])])


def unpack(words: torch.Tensor, device: torch.device):
    """(input_ids, positions, meta, rows) of a packed step, its tensors on device."""
    t, b, w, prefills, prefill_tokens, r = words[:HEAD].tolist()
    lens = words[HEAD:HEAD + 2 * b].tolist()
    at = HEAD + 2 * b
    flat = words[at:at + 4 * t].view(4, t).to(device)
    at += 4 * t
    gather = words[at:at + b * w].view(b, w).to(device)
    rows = None if r < 0 else words[at + b * w:at + b * w + r].to(device)
    meta = AttentionMetadata(prefills, prefill_tokens, lens[:b], lens[b:], flat[2], gather, flat[3])
    return flat[0], flat[1], meta, rows
