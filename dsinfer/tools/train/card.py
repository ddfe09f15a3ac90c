"""MODEL_CARD.md for the trained default model: corpus, architecture, training, quality and sample completions."""
import ast
import platform
import textwrap
from pathlib import Path

SOURCES = {"stdlib": "the Python standard library", "packages": "the Python sources of installed packages",
           "both": "the Python standard library and the sources of installed packages"}
PROMPTS = ["def ", "import ", "class Stack:", "for i in range(", "    return "]


def parses(text: str) -> bool:
    """Whether the completion's whole lines parse as Python (a trailing unfinished line is dropped)."""
    lines = text.split("\n")
    body = textwrap.dedent("\n".join(lines[:-1] if len(lines) > 1 else lines))
    for candidate in (body, body + "\n    pass"):
        try:
            ast.parse(candidate)
            return True
        except SyntaxError:
            continue
    return False


def completions(model_dir: Path, max_tokens: int = 64) -> list[tuple[str, str, bool]]:
    from dsinfer import LLM, SamplingParams
    llm = LLM(str(model_dir), dtype="float32")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return [(p, o.outputs[0].text, parses(p + o.outputs[0].text)) for p, o in zip(PROMPTS, outs)]


def expert_table(counts) -> list[str]:
    n = counts.shape[1]
    rows = ["| MoE layer | " + " | ".join(f"e{i}" for i in range(n)) + " | max/mean |",
            "|---" * (n + 2) + "|"]
    for layer, row in enumerate(counts.tolist()):
        share = [c / max(1, sum(row)) for c in row]
        label = f"{layer + 1}" if layer + 1 < len(counts) else f"{layer + 1} (MTP)"
        rows.append(f"| {label} | " + " | ".join(f"{s:.1%}" for s in share) + f" | {max(share) * n:.2f} |")
    return rows


def write(out: Path, *, arch, cfg, corpus: dict, log, params: dict, samples) -> str:
    final = log.final
    tail = log.losses[-50:]
    where = f"{corpus['threads']} CPU threads" if cfg.device == "cpu" else f"a {cfg.device} device"
    text = [
        "# dsinfer default model", "",
        "A small code-completion model with the DeepSeek-V3 architecture, trained by "
        f"`python -m dsinfer.tools.train` on {SOURCES[corpus['kind']]}. It exists so that dsinfer has a real "
        "model to run and measure without a download; it writes Python-looking code, not correct programs.", "",
        "## Corpus",
        f"- Python {platform.python_version()}: {SOURCES[corpus['kind']]}, `.py` files, test packages excluded: "
        f"{corpus['train_files']} training files ({corpus['train_tokens']:,} tokens), {corpus['val_files']} "
        f"validation files ({corpus['val_tokens']:,} tokens), split by a hash of each file's path.",
        f"- Tokenizer: byte-level BPE, {arch.vocab_size} tokens, trained on the training files; `<bos>`, "
        "`<eos>`, `<pad>`; a chat template in tokenizer_config.json.", "",
        "## Architecture",
        f"- `deepseek_v3`, {arch.num_hidden_layers} layers (layer 0 dense, the rest MoE), hidden {arch.hidden_size}, "
        f"{arch.num_attention_heads} heads; MLA with q_lora_rank {arch.q_lora_rank}, kv_lora_rank "
        f"{arch.kv_lora_rank}, rope dims {arch.qk_rope_head_dim}, nope dims {arch.qk_nope_head_dim}, v dims "
        f"{arch.v_head_dim}.",
        f"- MoE: 1 shared + {arch.n_routed_experts} routed experts (intermediate {arch.moe_intermediate_size}), "
        "2 per token, sigmoid scores with noaux_tc selection (4 groups, 2 chosen), bias balanced without an "
        "auxiliary loss.",
        f"- One MTP layer (`model.layers.{arch.num_hidden_layers}`: enorm, hnorm, eh_proj, a MoE decoder layer, "
        "shared_head.norm; embedding and head shared with the main model).",
        f"- Parameters: {params['main']:,} in the main model, {params['mtp']:,} in the MTP layer; weights stored "
        "in bf16.", "",
        "## Training",
        f"- {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens ({log.tokens:,} tokens), AdamW "
        f"(lr {cfg.lr}, warmup {cfg.warmup}, cosine to {cfg.min_lr_ratio} x), MTP loss weight {cfg.mtp_weight}, "
        f"bias update {cfg.bias_update}, seed {cfg.seed}, fp32 on {where}.",
        f"- Training time: {log.seconds / 60:.1f} minutes ({log.tokens / log.seconds:.0f} tokens/s).", "",
        "## Results (held-out files)",
        f"- Final training loss (mean of the last {len(tail)} steps): {sum(tail) / len(tail):.3f}",
        f"- Validation loss {final['loss']:.3f}, perplexity {final['ppl']:.2f} per token, next-token accuracy "
        f"{final['acc']:.1%} ({final['tokens']:,} tokens)",
        f"- MTP head: next-next-token accuracy {final['mtp_acc']:.1%} (loss {final['mtp_loss']:.3f})", "",
        "Tokens per routed expert on the validation set (share of routed slots; max/mean 1.00 is perfect balance):", "",
        *expert_table(final["expert_counts"]), "",
        "## Greedy completions (64 tokens, verbatim; 'parses' = its whole lines parse with `ast`)", "",
    ]
    for prompt, completion, ok in samples:
        text += [f"Prompt `{prompt!r}`, parses: {'yes' if ok else 'no'}", "", "```python",
                 (prompt + completion).replace("```", "'''"), "```", ""]
    (out / "MODEL_CARD.md").write_text("\n".join(text))
    return "\n".join(text)


DISTILL_HEADING = "## MTP layer: self-distillation"


def add_distillation(out: Path, *, cfg, corpus: dict, log) -> str:
    """Adds (or replaces) the card's distillation section: what ran, and the held-out figures before and after."""
    where = f"{corpus['threads']} CPU threads" if cfg.device == "cpu" else f"a {cfg.device} device"
    before, after = log.evals[0][1], log.final
    rows = [("agreement of the MTP's top token with the main model's next (greedy acceptance)", "agree", "{:.1%}"),
            ("next-next-token accuracy", "acc", "{:.1%}"), ("KL to the main model's next distribution", "kl", "{:.3f}"),
            ("next-next-token loss", "ce", "{:.3f}")]
    section = [
        DISTILL_HEADING, "",
        f"The MTP layer was then trained alone by `python -m dsinfer.tools.train.distill` (the main model frozen and "
        f"unchanged) to predict the main model's next-token distribution: KL plus {cfg.data_weight} x the corpus "
        f"loss, {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens ({log.tokens:,} tokens) of "
        f"{SOURCES[corpus['kind']]} ({corpus['train_files']} training files), AdamW (lr {cfg.lr}, warmup "
        f"{cfg.warmup}, cosine to {cfg.min_lr_ratio} x), seed {cfg.seed}, fp32 on {where}, "
        f"{log.seconds / 60:.1f} minutes.", "",
        f"| held-out ({corpus['val_files']} files, {corpus['val_tokens']:,} tokens) | before | after |",
        "|---|---:|---:|",
        *(f"| {label} | {fmt.format(before[key])} | {fmt.format(after[key])} |" for label, key, fmt in rows), ""]
    text = (out / "MODEL_CARD.md").read_text()
    text = text.split(DISTILL_HEADING)[0].rstrip("\n") + "\n\n" + "\n".join(section)
    (out / "MODEL_CARD.md").write_text(text)
    return "\n".join(section)
