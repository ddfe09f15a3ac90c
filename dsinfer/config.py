"""ModelConfig: the parts of a DeepSeek config.json the engine uses, checked on load."""
from dataclasses import dataclass, field

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa")
INDEXER_MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa")  # DeepSeek sparse attention: a lightning indexer
_DEFAULTS = {  # what each family means when a key is absent
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy"},
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"},
    "deepseek_v32": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "index_n_heads": 64,
                     "index_head_dim": 128, "index_topk": 2048},
    "glm_moe_dsa": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "index_n_heads": 32,
                    "index_head_dim": 128, "index_topk": 2048},
}
_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    q_lora_rank: int | None = None
    moe_intermediate_size: int = 0
    n_routed_experts: int | None = None
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    quantization_config: dict | None = None
    index_n_heads: int = 0     # V3.2 indexer: heads, head dim (its first qk_rope_head_dim are roped), keys kept
    index_head_dim: int = 0
    index_topk: int = 0
    indexer_types: list[str] | None = None  # GLM-MoE-DSA: per layer "full" (own indexer) or "shared" (previous's)

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token and layer: the normalized latent plus the shared roped key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        return self.model_type in INDEXER_MODEL_TYPES

    @property
    def interleaved_index_rope(self) -> bool:
        """GLM-MoE-DSA turns the indexer's rope slice in interleaved pairs; DeepSeek-V3.2 in NeoX halves."""
        return self.model_type == "glm_moe_dsa"

    def runs_indexer(self, i: int) -> bool:
        """Whether layer i has its own indexer (else it reuses the previous full layer's top-k)."""
        return self.has_indexer and (self.indexer_types is None or self.indexer_types[i] == "full")

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r}; dsinfer supports {', '.join(SUPPORTED_MODEL_TYPES)}")
        d = {**_DEFAULTS[mt], **{k: v for k, v in d.items() if v is not None}}
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        if rope:
            rope = dict(rope)
            d.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            kind = rope.get("rope_type", rope.get("type", "default"))
            d["rope_scaling"] = None if kind == "default" else {**rope, "type": kind}
        eos = d.get("eos_token_id", [])
        d["eos_token_id"] = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        names = set(cls.__dataclass_fields__)
        missing = [n for n, f in cls.__dataclass_fields__.items() if n not in d and _required(f)]
        if missing:
            raise ValueError(f"config.json is missing required key(s): {', '.join(missing)}")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.validate()
        return cfg

    def validate(self):
        if self.rope_scaling and self.rope_scaling["type"] != "yarn":
            raise ValueError(f"unsupported rope scaling type {self.rope_scaling['type']!r}; dsinfer supports yarn")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; DeepSeek models use silu")
        if self.has_indexer and not (self.index_n_heads > 0 and self.index_topk > 0
                                     and self.qk_rope_head_dim <= self.index_head_dim and self.q_lora_rank):
            raise ValueError(f"{self.model_type} needs index_n_heads and index_topk > 0, index_head_dim >= "
                             f"qk_rope_head_dim and a q_lora_rank (the indexer's query comes from the query latent)")
        if self.indexer_types is not None and (len(self.indexer_types) != self.num_hidden_layers
                                               or set(self.indexer_types) - {"full", "shared"}
                                               or self.indexer_types[0] != "full"):
            raise ValueError(f"indexer_types must give 'full' or 'shared' for each of the {self.num_hidden_layers} "
                             f"layers, the first 'full', got {self.indexer_types}")
        if not self.n_routed_experts:
            return
        if self.topk_method not in _TOPK_METHODS:
            raise ValueError(f"unsupported topk_method {self.topk_method!r}; expected one of {_TOPK_METHODS}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"unsupported scoring_func {self.scoring_func!r}; expected softmax or sigmoid")
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts")
        if self.n_routed_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"n_group={self.n_group}/topk_group={self.topk_group} do not divide "
                             f"{self.n_routed_experts} experts")


def _required(f) -> bool:
    from dataclasses import MISSING
    return f.default is MISSING and f.default_factory is MISSING
