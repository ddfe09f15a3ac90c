"""How one token's row of the latent cache is stored: the normalized latent (kv_lora_rank values) and the
shared roped key (qk_rope_head_dim values), in one of three formats.

- float32 / bfloat16: the r + dr values in that dtype.
- fp8 (DeepSeek's FlashMLA layout): the r latent values in float8 e4m3, one fp32 scale per 128 of them
  (scale = max|x| / 448, the largest e4m3 value), then the dr rope values in bf16, as raw bytes in a uint8
  row: r + 4 * ceil(r / 128) + 2 * dr bytes (656 for r = 512, dr = 64), against 2,304 in fp32.
A cache tensor's dtype says its format (uint8: fp8), so attention reads and writes any cache the same way."""
import torch

FP8_GROUP = 128
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "fp8")


def row_bytes(kv_dtype: str, r: int, dr: int) -> int:
    """Bytes of one token's row in one layer."""
    if kv_dtype == "fp8":
        return r + 4 * -(-r // FP8_GROUP) + 2 * dr
    return (r + dr) * {"float32": 4, "bfloat16": 2}[kv_dtype]


def storage_dtype(kv_dtype: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp8": torch.uint8}[kv_dtype]


def resolve(kv_dtype: str, model_dtype: torch.dtype) -> str:
    """auto: the model's dtype, as vLLM's auto means the model's."""
    if kv_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_dtype!r}")
    if kv_dtype != "auto":
        return kv_dtype
    return "bfloat16" if model_dtype in (torch.bfloat16, torch.float16) else "float32"


def allocate(kv_dtype: str, rows: int, r: int, dr: int, device) -> torch.Tensor:
    width = row_bytes(kv_dtype, r, dr) if kv_dtype == "fp8" else r + dr
    return torch.zeros(rows, width, dtype=storage_dtype(kv_dtype), device=device)


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.uint8


def encode_fp8(latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """latent [T, r], k_pe [T, dr] -> fp8 rows uint8 [T, row_bytes]."""
    t, r = latent.shape
    ng = -(-r // FP8_GROUP)
    x = torch.nn.functional.pad(latent.float(), (0, ng * FP8_GROUP - r)).view(t, ng, FP8_GROUP)
    scale = x.abs().amax(-1).clamp_min(1e-12) / FP8_MAX                              # [T, G]
    codes = (x / scale[..., None]).to(torch.float8_e4m3fn).view(t, -1)[:, :r]
    return torch.cat([codes.view(torch.uint8), scale.contiguous().view(torch.uint8).view(t, -1),
                      k_pe.to(torch.bfloat16).contiguous().view(torch.uint8).view(t, -1)], -1)


def decode_fp8(rows: torch.Tensor, r: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 rows uint8 [..., row_bytes] -> [..., r + dr] in dtype: the latent times its group's scale, then the
    rope values."""
    lead, ng = rows.shape[:-1], -(-r // FP8_GROUP)
    codes = rows[..., :r].contiguous().view(torch.float8_e4m3fn).float()
    scale = rows[..., r:r + 4 * ng].contiguous().view(torch.float32)                 # [..., G]
    latent = codes * scale.repeat_interleave(FP8_GROUP, -1)[..., :r]
    rope = rows[..., r + 4 * ng:].contiguous().view(torch.bfloat16).float()
    return torch.cat([latent, rope], -1).to(dtype).view(*lead, -1)


def write_rows(cache: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor):
    """Each new token's row (normalized latent, roped key) at its slot, in the cache's format."""
    row = encode_fp8(latent, k_pe) if is_fp8(cache) else torch.cat([latent, k_pe], -1).to(cache.dtype)
    cache.index_copy_(0, slots, row)


def read_rows(cache: torch.Tensor, index: torch.Tensor, r: int, dtype: torch.dtype) -> torch.Tensor:
    """cache[index] as [*index.shape, r + dr] values in dtype, for an index of any shape."""
    flat = cache.index_select(0, index.reshape(-1))
    values = decode_fp8(flat, r, dtype) if is_fp8(cache) else flat.to(dtype)
    return values.view(*index.shape, values.shape[-1])
