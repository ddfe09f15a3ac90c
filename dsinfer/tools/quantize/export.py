"""`dsinfer quantize`: calibrate a full-precision checkpoint, quantize every unit (RTN, GPTQ, or GPTQ at 4 and 8
bits with a per-unit choice), and write a checkpoint in the hub's GPTQ layout that LLM() loads directly."""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dsinfer.llm import LLM
from dsinfer.models.loader import SAFETENSORS_DTYPES, checkpoint_views, tensor_info
from dsinfer.models.quant_plan import Unit, group_size_for, quantize_unit, summary, units
from dsinfer.quant import gptq_format
from dsinfer.quant.qtensor import QTensor, expand_groups, quantize_codes, symmetric_scales
from dsinfer.tools.quantize import mixed
from dsinfer.tools.quantize.calibrate import HessianRecorder, calibration_sequences, default_calibration_text, record
from dsinfer.tools.quantize.gptq import gptq, output_error

METHODS = ("rtn", "gptq", "mixed")


@dataclass(slots=True)
class QuantizeArgs:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    calibration: str = "default"
    target_bits: float = 4.5
    samples: int = 128
    seq_len: int = 512
    damp: float = 0.01
    act_order: bool = True

    def check(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in (4, 8):
            raise ValueError(f"--bits must be 4 or 8, got {self.bits}")
        if self.group_size != -1 and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"--group-size must be -1 (per channel) or a positive even number, got {self.group_size}")
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError("--samples must be at least 1 and --seq-len at least 2")


def quantize_matrix(w, h, bits: int, group: int, args: QuantizeArgs):
    """(codes, scales) for one [N, K] matrix; a matrix no calibration token reached gets an identity Hessian."""
    if not h.any():
        h = torch.eye(w.shape[1])
    if args.method == "rtn":
        scales = symmetric_scales(w, bits, group).half().float()
        return quantize_codes(w, scales, bits, group), scales
    return gptq(w, h, bits, group, args.damp, args.act_order)


def error_of(w, codes, scales, group: int, h, tokens: int) -> float:
    return output_error(w, codes.float() * expand_groups(scales, w.shape[-1], group), h) if tokens else 0.0


def quantize_weights(unit: Unit, rec: HessianRecorder, bits: int, args: QuantizeArgs):
    """(codes, scales, summed output error) for a unit; stacked experts use their blended Hessians for GPTQ
    and their own tokens for the error."""
    w = unit.weight.data
    group = group_size_for(bits, args.group_size, w.shape[-1])
    if w.dim() == 2:
        h, n = rec.hessian(w)
        codes, scales = quantize_matrix(w, h, bits, group, args)
        return codes, scales, error_of(w, codes, scales, group, h, n)
    parts = []
    for e, h in enumerate(rec.expert_hessians(w)):
        codes, scales = quantize_matrix(w[e], h, bits, group, args)
        parts.append((codes, scales, error_of(w[e], codes, scales, group, *rec.hessian(w[e]))))
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), sum(p[2] for p in parts)


def quantize_checkpoint(src: str, dst: str, args: QuantizeArgs, log=print) -> dict[str, int]:
    args.check()
    llm = LLM(src, dtype="float32", device="cpu", cpu_kernels=False)  # calibration records the torch path
    if llm.tokenizer is None:
        raise ValueError(f"{src} has no tokenizer.json, which calibration needs")
    text = default_calibration_text() if args.calibration == "default" else Path(args.calibration).read_text()
    seqs = calibration_sequences(llm.tokenizer, text, args.samples, min(args.seq_len, llm.max_model_len))
    log(f"calibrating on {len(seqs)} sequences of {len(seqs[0])} tokens")
    rec = record(llm.model, seqs)
    us = units(llm.model)
    widths = (4, 8) if args.method == "mixed" else (args.bits,)
    results = {u.name: {b: quantize_weights(u, rec, b, args) for b in widths}
               for u in tqdm(us, desc=f"{args.method} quantizing", unit="matrix")}
    choice = {u.name: args.bits for u in us}
    if args.method == "mixed":
        sizes = {u.name: u.numel for u in us}
        groups = {u.name: group_size_for(4, args.group_size, u.weight.shape[-1]) for u in us}
        errors = {n: {b: r[b][2] for b in r} for n, r in results.items()}
        choice = mixed.choose_bits(sizes, errors, groups, args.target_bits)
        log(mixed.table(sizes, errors, choice, groups))
    for u in us:
        if choice[u.name] != 16:
            codes, scales, _ = results[u.name][choice[u.name]]
            quantize_unit(u, choice[u.name], args.group_size)
            u.weight.store_codes(codes, scales)
    write_checkpoint(llm, Path(src), Path(dst), args)
    return summary(llm.model)


def write_checkpoint(llm, src: Path, dst: Path, args: QuantizeArgs):
    info = tensor_info(src)
    tensors = {}
    for name, v in checkpoint_views(llm.model).items():
        if isinstance(v, QTensor):
            for suffix, t in gptq_format.pack(v.codes(), v.scales, v.bits, v.group_size).items():
                tensors[name[:-len("weight")] + suffix] = t
        else:
            tensors[name] = v.to(SAFETENSORS_DTYPES.get(info[name][1], v.dtype)).contiguous().clone()
    for name, file in llm.mtp_tensors.items():  # the MTP layer is copied as it is
        with safe_open(src / file, "pt") as f:
            tensors[name] = f.get_tensor(name)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(summary(llm.model), args)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def quantization_config(modules: dict[str, int], args: QuantizeArgs) -> dict:
    """The hub's GPTQ fields, plus dsinfer's record of what was quantized and how."""
    bits = args.bits if args.method != "mixed" else 4
    return {"quant_method": "gptq", "bits": bits, "group_size": args.group_size, "desc_act": False,
            "sym": True, "static_groups": True, "checkpoint_format": "gptq", "damp_percent": args.damp,
            "dsinfer": {"method": args.method, "act_order": args.act_order and args.method != "rtn",
                        "target_bits": args.target_bits if args.method == "mixed" else None,
                        "calibration": args.calibration, "samples": args.samples, "seq_len": args.seq_len,
                        "modules": modules, "full_precision": ["embeddings", "norms", "routers", "kv_b_proj"]}}
