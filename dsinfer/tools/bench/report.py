"""The bench's outputs: the table on stdout and the JSON record (figures, settings, machine, versions, date)."""
import datetime
import json
import os
import platform
from pathlib import Path

# SIMD and matrix extensions that decide which CPU kernels run fast (x86 'flags', Arm 'Features')
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "sve2",
             "bf16", "i8mm")


def print_report(ours: dict, peer: dict):
    """ratio = dsinfer / transformers: above 1 is better for rates, below 1 is better for times (ms)."""
    width = max(len(name) for figures in ours.values() for name in figures) + 2
    header = f"{'figure':<{width}}{'dsinfer':>12}" + (f"{'transformers':>14}{'ratio':>9}" if peer else "")
    for section, figures in ours.items():
        print(f"\n[{section}]\n{header}")
        for name, value in figures.items():
            line = f"{name:<{width}}{value:>12.2f}"
            other = peer.get(section, {}).get(name)
            if other is not None:
                line += f"{other:>14.2f}{value / other:>9.2f}"
            print(line)
    if peer:
        print("\nratio = dsinfer / transformers: higher is better for rates, lower is better for times (ms)")


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """The CPU's model name and which of ISA_FLAGS it has, from /proc/cpuinfo (Linux); elsewhere what
    `platform` knows."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        lines = []
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    model = fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
    return {"cpu_model": model, "isa": [f for f in ISA_FLAGS if f in flags], "logical_cpus": os.cpu_count(),
            "machine": platform.machine(), "os": platform.platform()}


def versions(compare: bool) -> dict:
    import torch

    import dsinfer
    found = {"dsinfer": dsinfer.__version__, "python": platform.python_version(), "torch": torch.__version__}
    if compare:
        import transformers
        found["transformers"] = transformers.__version__
    return found


def record(settings: dict, ours: dict, peer: dict) -> dict:
    """Everything a later reader needs to compare this run with another: raw figures (rates per second, times
    in milliseconds), the settings they were taken with, the machine and the versions."""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "versions": versions(bool(peer)), "machine": cpu_info(), "settings": settings,
            "results": {"dsinfer": ours, "transformers": peer or None}}


def write_json(path: str, rec: dict):
    Path(path).write_text(json.dumps(rec, indent=2, default=str) + "\n")
