"""The HF `config.json` converted once into frozen, typed configs.

Every `dict.get(..., default)` for model hyper-parameters lives here, so layers receive plain ints and
floats and never consult the raw JSON. Both spellings of RoPE settings are accepted: transformers 4.x
(`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwenrun.errors import CheckpointError
from qwenrun.vision_config import VisionConfig


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; `rope_type` is "default" or "yarn" (the two Qwen3 uses)."""

    theta: float = 10000.0
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    mrope_section: tuple[int, ...] | None = None  # vision models' t/h/w split of the rotary frequencies

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], default_partial_rotary: float = 1.0) -> RopeConfig:
        """`default_partial_rotary`: the family's value when neither spelling sets it (Qwen3-Next and
        Qwen3.5 rotate a quarter of each head unless told otherwise, as transformers assumes).

        `mrope_section` is kept for vision inputs; text positions are equal on the t/h/w axes, and
        with equal positions the sections all read the same angles: interleaved MRoPE is plain RoPE."""
        rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rp.get("rope_type") or rp.get("type") or "default"
        if rope_type not in ("default", "yarn"):
            raise CheckpointError(
                f"rope type {rope_type!r} is not supported (Qwen3 uses 'default' or 'yarn')"
            )
        theta = rp.get("rope_theta") or cfg.get("rope_theta") or 10000.0
        prf = rp.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or default_partial_rotary
        section = rp.get("mrope_section") or cfg.get("mrope_section")
        mrope = tuple(int(n) for n in section) if section else None
        max_pos = cfg.get("max_position_embeddings")
        if rope_type == "default":
            return cls(theta=float(theta), partial_rotary_factor=float(prf), mrope_section=mrope)
        orig = rp.get("original_max_position_embeddings") or max_pos
        factor = rp.get("factor")
        if factor is None:
            if not (orig and max_pos):
                raise CheckpointError("yarn rope scaling needs 'factor' or max_position_embeddings")
            factor = max_pos / orig
        return cls(
            theta=float(theta),
            rope_type="yarn",
            partial_rotary_factor=float(prf),
            factor=float(factor),
            original_max_position_embeddings=int(orig) if orig else None,
            attention_factor=rp.get("attention_factor"),
            beta_fast=float(rp.get("beta_fast") or 32.0),
            beta_slow=float(rp.get("beta_slow") or 1.0),
            mscale=rp.get("mscale"),
            mscale_all_dim=rp.get("mscale_all_dim"),
            truncate=bool(rp.get("truncate", True)),
            mrope_section=mrope,
        )


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    shared_expert_intermediate_size: int = 0  # Qwen3-Next / Qwen3.5: one always-on expert behind a sigmoid gate

    def is_sparse(self, layer: int) -> bool:
        """Which layers use experts, exactly as `Qwen3MoeDecoderLayer.__init__` decides."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


LINEAR, FULL = "linear_attention", "full_attention"
# model types of the hybrid Gated DeltaNet + gated attention block (Qwen3.5 nests "*_text" in text_config)
HYBRID_MODEL_TYPES = ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")


@dataclass(frozen=True)
class LinearAttentionConfig:
    """The hybrid block's Gated DeltaNet layers (Qwen3-Next, Qwen3.5): which layers they are and their
    head shapes. The full-attention layers of such a model gate their output (`q_proj` yields query
    and gate per head) and use zero-centred norms; that follows from the family, not a field."""

    layer_types: tuple[str, ...]  # LINEAR or FULL, one per layer
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int

    def __post_init__(self) -> None:
        bad = sorted(set(self.layer_types) - {LINEAR, FULL})
        if bad:
            raise CheckpointError(f"config.json layer_types has unknown kind(s) {bad}; expected {LINEAR!r} or {FULL!r}")
        if self.num_value_heads % self.num_key_heads:
            raise CheckpointError(
                f"linear_num_value_heads ({self.num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.num_key_heads})"
            )

    def is_linear(self, layer: int) -> bool:
        return self.layer_types[layer] == LINEAR

    @property
    def conv_dim(self) -> int:
        return 2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], num_layers: int) -> LinearAttentionConfig:
        """transformers' defaults for missing fields; `layer_types` else every `full_attention_interval`-th
        layer (default 4) is full attention."""
        types = cfg.get("layer_types")
        if types is None:
            interval = int(cfg.get("full_attention_interval") or 4)
            types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(num_layers)]
        if len(types) != num_layers:
            raise CheckpointError(
                f"config.json layer_types has {len(types)} entries for {num_layers} layers (num_hidden_layers)"
            )
        return cls(
            layer_types=tuple(types),
            num_key_heads=int(cfg.get("linear_num_key_heads") or 16),
            num_value_heads=int(cfg.get("linear_num_value_heads") or 32),
            key_head_dim=int(cfg.get("linear_key_head_dim") or 128),
            value_head_dim=int(cfg.get("linear_value_head_dim") or 128),
            conv_kernel=int(cfg.get("linear_conv_kernel_dim") or 4),
        )

    def num_parameters(self, hidden: int) -> int:
        """One Gated DeltaNet layer: in_proj (q, k, v, z, b, a), conv1d, dt_bias, A_log, gated norm, out_proj."""
        Hv, dv = self.num_value_heads, self.value_head_dim
        in_proj = hidden * (self.conv_dim + Hv * dv + 2 * Hv)
        return in_proj + self.conv_dim * self.conv_kernel + 2 * Hv + dv + Hv * dv * hidden


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    rope: RopeConfig
    torch_dtype: str | None
    moe: MoeConfig | None = None
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)
    linear: LinearAttentionConfig | None = None  # hybrid models only
    vision: VisionConfig | None = None  # vision-language models (a `vision_config` in config.json)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a parsed config.json; a missing or malformed field is named in the error."""
        try:
            return cls._from_hf(cfg)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise CheckpointError(f"config.json has a malformed field: {e}") from None

    @classmethod
    def _from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            raise CheckpointError("config.json has no 'architectures' entry")
        outer = cfg
        cfg = {**cfg, **cfg.get("text_config", {})}
        # a *ForConditionalGeneration model ties by its own (outer) config, False unless set there
        tied = (outer if "text_config" in outer else cfg).get("tie_word_embeddings", False)
        model_type = cfg.get("model_type", "")
        hybrid = model_type in HYBRID_MODEL_TYPES

        def need(key: str) -> Any:
            value = cfg.get(key)
            if value is None:
                raise CheckpointError(f"config.json is missing required field {key!r}")
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"config.json field {key!r} must be a positive integer, got {value!r}")
            return value

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        layers = int(need("num_hidden_layers"))
        moe = None
        num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")  # 4.x / 5.x spelling
        if num_experts:
            # Qwen3.5-MoE has no norm_topk_prob / decoder_sparse_step / mlp_only_layers: its router always
            # renormalises and every layer is sparse; Qwen3-Next renormalises unless told otherwise
            every_sparse = model_type.startswith("qwen3_5_moe")
            # Qwen3-VL-MoE keeps the sparse-layer fields but its router always renormalises
            renormalise = every_sparse or model_type.startswith("qwen3_vl_moe")
            moe = MoeConfig(
                num_experts=int(num_experts),
                num_experts_per_tok=int(need("num_experts_per_tok")),
                moe_intermediate_size=int(need("moe_intermediate_size")),
                norm_topk_prob=renormalise or bool(cfg.get("norm_topk_prob", model_type == "qwen3_next")),
                decoder_sparse_step=1 if every_sparse else int(cfg.get("decoder_sparse_step") or 1),
                mlp_only_layers=() if every_sparse else tuple(cfg.get("mlp_only_layers") or ()),
                shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
            )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=archs[0],
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size") or 0),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 32768),
            rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
            tie_word_embeddings=bool(tied),
            attention_bias=bool(cfg.get("attention_bias", False)),
            rope=RopeConfig.from_hf(cfg, 0.25 if hybrid else 1.0),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype") or outer.get("torch_dtype") or outer.get("dtype"),
            moe=moe,
            eos_token_id=eos_ids,
            linear=LinearAttentionConfig.from_hf(cfg, layers) if hybrid else None,
            vision=VisionConfig.from_hf(outer),
        )

    def num_parameters(self) -> int:
        """Parameter count from the shapes alone (for `qwenrun info` and memory estimates)."""
        h, d = self.hidden_size, self.head_dim
        nq = self.num_attention_heads * (2 if self.linear is not None else 1)  # gated attention: query + gate
        attn = h * d * (nq + self.num_attention_heads + self.num_key_value_heads * 2) + 2 * d
        attn += (nq + 2 * self.num_key_value_heads) * d * self.attention_bias + h * self.attention_bias
        total = 0
        for layer in range(self.num_hidden_layers):
            if self.moe is not None and self.moe.is_sparse(layer):
                mlp = self.moe.num_experts * (3 * h * self.moe.moe_intermediate_size + h)  # experts + router
                if self.moe.shared_expert_intermediate_size:
                    mlp += 3 * h * self.moe.shared_expert_intermediate_size + h  # shared expert + its gate
            else:
                mlp = 3 * h * self.intermediate_size
            linear = self.linear is not None and self.linear.is_linear(layer)
            total += (self.linear.num_parameters(h) if linear else attn) + mlp + 2 * h
        emb = self.vocab_size * h
        return total + emb + h + (0 if self.tie_word_embeddings else emb)

    def num_active_parameters(self) -> int:
        """Parameters touched per token: MoE reads only the selected experts."""
        if self.moe is None:
            return self.num_parameters()
        idle = self.moe.num_experts - self.moe.num_experts_per_tok
        sparse_layers = sum(self.moe.is_sparse(i) for i in range(self.num_hidden_layers))
        return self.num_parameters() - sparse_layers * idle * 3 * self.hidden_size * self.moe.moe_intermediate_size
