"""Model configuration: one frozen dataclass for every supported family.

`ModelConfig.from_hf` reads a checkpoint's `config.json` (as a dict) and accepts the
key spellings of both transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`). Nothing model-specific lives in the model code: every switch
that differs between Llama-3 and Gemma-2 is a field here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

from fr_jax.config import CHOICES
from fr_jax.runtime.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "gemma2")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# The words of config.model's fields, declared once in their config rows.
REMAT_CHOICES = CHOICES["model.remat"]
ATTENTION_CHOICES = CHOICES["model.attention"]  # see fr_jax.models.splash
# HF activation names -> our names. Both spellings of tanh-GELU appear in checkpoints.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; `rope_type` is one of SUPPORTED_ROPE_TYPES."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (hashable: usable as a jit static arg).

    `layer_types[i]` is "sliding_attention" or "full_attention".
    `dtype` is the activation dtype, `param_dtype` the dtype params are created/loaded in;
    softmax, norms and logits are always computed in float32.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig = RopeConfig()
    rms_norm_eps: float = 1e-5
    activation: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 8192
    # Gemma-2 switches (inactive at their defaults).
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w) instead of w
    sandwich_norms: bool = False  # extra post-attention and post-MLP norms
    scale_embeddings: bool = False  # multiply embeddings by sqrt(hidden_size)
    query_pre_attn_scalar: Optional[float] = None  # queries scaled by this**-0.5, else head_dim**-0.5
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    # The final soft-cap left to the fusion rule (fusion.softcap=sum, fr_jax/routing/fusion.py):
    # logits() returns them uncapped; the cap stays above, for the rule and the export.
    raw_logits: bool = False
    sliding_window: Optional[int] = None
    layer_types: Tuple[str, ...] = ()
    # Special tokens, carried so decode can default its stop set.
    bos_token_id: Optional[int] = None
    eos_token_ids: Tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    # How the layer stack runs (not part of the checkpoint): `remat` = none | dots | full,
    # what the backward pass keeps of each layer (see fr_jax.models.transformer); with
    # `scan_unroll` the layer scan is unrolled (XLA's cost analysis counts a loop body once:
    # fr_jax.plan measures unrolled shallow variants).
    remat: str = "none"
    scan_unroll: bool = False
    # Attention over more than this many queries (a long prefill, a frozen expert's forward
    # in training) attends them this many at a time (fr_jax.models.layers.
    # dot_product_attention); 0 = never. A trained model uses 0: its backward pass would
    # keep every block's probabilities anyway.
    attn_block: int = 256
    # The cache-free forward's attention (fr_jax.models.splash): "xla" (einsums and a
    # softmax), "splash" (the fused TPU kernel; off TPU in the Pallas interpreter, for
    # tests), "auto" (splash when tracing for TPU at a multiple of 128 tokens, else xla).
    attention: str = "xla"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; fr_jax supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-3.x and Gemma-2 checkpoints)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries but the model has "
                              f"{self.num_layers} layers")
        bad = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if bad:
            raise ConfigError(f"unknown layer_types {sorted(bad)}; expected "
                              "'sliding_attention' or 'full_attention'")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError("layer_types has sliding layers but sliding_window is not set")
        if self.remat not in REMAT_CHOICES:
            raise ConfigError(f"unknown remat {self.remat!r}; choose one of "
                              f"{', '.join(REMAT_CHOICES)}")
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(f"unknown attention {self.attention!r}; choose one of "
                              f"{', '.join(ATTENTION_CHOICES)}")
        if self.activation not in set(_ACTIVATIONS.values()):
            raise ConfigError(f"unknown activation {self.activation!r}")
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"unsupported rope type {self.rope.rope_type!r}; supported: "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)}")

    @property
    def query_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5

    @property
    def embed_scale(self) -> Optional[float]:
        return math.sqrt(self.hidden_size) if self.scale_embeddings else None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], dtype: str = "float32",
                param_dtype: Optional[str] = None, source: str = "config.json") -> "ModelConfig":
        """Builds a config from an HF `config.json` dict (transformers 4.x or 5.x spelling)."""
        cfg = dict(cfg)
        model_type = cfg.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source} has no 'model_type'; is this a transformers checkpoint?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r}; fr_jax supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-3.x and Gemma-2 checkpoints)")

        def need(key):
            if key not in cfg:
                raise ConfigError(f"{source} is missing required key {key!r} for {model_type}")
            return cfg[key]

        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                    "intermediate_size", "num_key_value_heads", "head_dim",
                    "max_position_embeddings", "sliding_window"):
            v = cfg.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{source}: {key} must be a positive integer, got {v!r}; "
                                  "fix the checkpoint's config.json")
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        num_layers = int(need("num_hidden_layers"))
        head_dim = cfg.get("head_dim") or hidden // heads
        act_name = cfg.get("hidden_activation") or cfg.get("hidden_act") or (
            "silu" if model_type == "llama" else "gelu_pytorch_tanh")
        if act_name not in _ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported activation {act_name!r}; supported: "
                              f"{', '.join(sorted(_ACTIVATIONS))}")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
                        if e is not None)
        common = dict(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rope=_rope_from_hf(cfg, source),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if model_type == "gemma2" else 1e-5)),
            activation=_ACTIVATIONS[act_name],
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            dtype=dtype,
            param_dtype=param_dtype or dtype,
        )
        if model_type == "llama":
            return cls(**common, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
        # gemma2
        layer_types = cfg.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        return cls(
            **common,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            norm_plus_one=True,
            sandwich_norms=True,
            scale_embeddings=True,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
            attn_logit_softcap=_opt_float(cfg.get("attn_logit_softcapping")),
            final_logit_softcap=_opt_float(cfg.get("final_logit_softcapping")),
            sliding_window=cfg.get("sliding_window"),
            layer_types=tuple(layer_types),
        )

    def to_hf(self) -> dict:
        """The `config.json` dict (transformers 5.x spelling) that describes this model."""
        rope = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta}
        if self.rope.rope_type == "llama3":
            rope.update(factor=self.rope.factor, low_freq_factor=self.rope.low_freq_factor,
                        high_freq_factor=self.rope.high_freq_factor,
                        original_max_position_embeddings=self.rope.original_max_position_embeddings)
        elif self.rope.rope_type == "linear":
            rope.update(factor=self.rope.factor)
        act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[self.activation]
        eos = list(self.eos_token_ids)
        out = {
            "model_type": self.model_type,
            "architectures": ["LlamaForCausalLM" if self.model_type == "llama"
                              else "Gemma2ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "rope_parameters": rope,
            # 4.x readers look for these spellings.
            "rope_theta": self.rope.theta,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }
        if self.rope.rope_type != "default":
            out["rope_scaling"] = dict(rope)
        if self.model_type == "llama":
            out.update(hidden_act=act, mlp_bias=self.mlp_bias)
        else:
            qpas = self.query_pre_attn_scalar
            out.update(hidden_activation=act,
                       # transformers 5 validates this field as an int.
                       query_pre_attn_scalar=int(qpas) if float(qpas).is_integer() else qpas,
                       attn_logit_softcapping=self.attn_logit_softcap,
                       final_logit_softcapping=self.final_logit_softcap,
                       sliding_window=self.sliding_window, layer_types=list(self.layer_types))
        return out


def _opt_float(x) -> Optional[float]:
    return None if x is None else float(x)


def _rope_from_hf(cfg: Mapping[str, Any], source: str) -> RopeConfig:
    """Reads rope settings from `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: unsupported rope type {rope_type!r}; fr_jax supports "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    kw = dict(theta=float(theta), rope_type=rope_type)
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"):
            if key not in merged:
                raise ConfigError(f"{source}: llama3 rope scaling is missing {key!r}")
        kw.update(factor=float(merged["factor"]), low_freq_factor=float(merged["low_freq_factor"]),
                  high_freq_factor=float(merged["high_freq_factor"]),
                  original_max_position_embeddings=int(merged["original_max_position_embeddings"]))
    elif rope_type == "linear":
        kw.update(factor=float(merged.get("factor", 1.0)))
    return RopeConfig(**kw)
