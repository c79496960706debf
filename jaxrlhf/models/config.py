"""Architecture of a decoder-only transformer, and its translation to and from HF config.json.

`TransformerConfig` is frozen and hashable so it can be closed over (static) by jitted steps.
It covers the Llama, Qwen2, Qwen3 and Mistral families as transformers configures them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxrlhf.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


class ModelConfigError(ConfigError):
    """A config.json (or architecture field) this package cannot run; one sentence for the user."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; ``rope_type`` is one of `SUPPORTED_ROPE_TYPES`."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and options of the decoder; param/compute dtypes are explicit."""

    model_type: str = "qwen2"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Sliding window size per layer (None = full attention), HF `layer_types` semantics.
    sliding_windows: tuple[int | None, ...] | None = None
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"unsupported model_type {self.model_type!r}; expected one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"unsupported rope type {self.rope.rope_type!r}; expected one of "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}."
            )
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ModelConfigError(
                    f"{name} {getattr(self, name)!r} is not supported; expected one of "
                    f"{', '.join(DTYPES)}."
                )
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}."
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ModelConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly."
            )
        if self.sliding_windows is not None and len(self.sliding_windows) != self.num_layers:
            raise ModelConfigError(
                f"sliding_windows has {len(self.sliding_windows)} entries for "
                f"{self.num_layers} layers."
            )

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def replace(self, **changes: Any) -> TransformerConfig:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- HF config.json


def _rope_from_hf(hf: dict[str, Any], where: str) -> RopeConfig:
    """RoPE settings from 5.x `rope_parameters` or 4.x `rope_theta` / `rope_scaling`."""
    params = hf.get("rope_parameters")
    if params is not None:
        if "rope_type" not in params and "rope_theta" not in params:
            raise ModelConfigError(
                f"{where}: per-layer-type rope_parameters are not supported for "
                f"model_type {hf.get('model_type')!r}."
            )
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"{where}: rope type {rope_type!r} is not supported; expected one of "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0) or 1.0),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
    )


def _windows_from_hf(hf: dict[str, Any], model_type: str, num_layers: int) -> tuple | None:
    if model_type == "mistral":
        window = hf.get("sliding_window")
        return None if window is None else (int(window),) * num_layers
    if model_type in ("qwen2", "qwen3"):
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        if window is None:
            return None
        layer_types = hf.get("layer_types")
        if layer_types is None:
            start = hf.get("max_window_layers", num_layers)
            layer_types = [
                "sliding_attention" if i >= start else "full_attention" for i in range(num_layers)
            ]
        windows = tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
        return windows if any(w is not None for w in windows) else None
    return None


_REQUIRED_INTS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)  # fmt: skip


def config_from_hf(
    hf: dict[str, Any],
    *,
    param_dtype: str = "float32",
    compute_dtype: str | None = None,
    remat: bool = False,
    where: str = "config.json",
) -> TransformerConfig:
    """Translate an HF config dict (transformers 4.x or 5.x layout) into a `TransformerConfig`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"{where}: unsupported model_type {model_type!r}; expected one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    for key in _REQUIRED_INTS:
        if key not in hf:
            raise ModelConfigError(f"{where}: required key {key!r} is missing.")
        if isinstance(hf[key], bool) or not isinstance(hf[key], int) or hf[key] < 1:
            raise ModelConfigError(f"{where}: {key} is {hf[key]!r}; expected a positive integer.")
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported.")
    num_layers = int(hf["num_hidden_layers"])
    num_heads = int(hf["num_attention_heads"])
    attention_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    return TransformerConfig(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=hf.get("head_dim"),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(hf, where),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        sliding_windows=_windows_from_hf(hf, model_type, num_layers),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        param_dtype=param_dtype,
        compute_dtype=compute_dtype or param_dtype,
        remat=remat,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    """An HF config dict (4.x layout, which transformers 4.x and 5.x both read)."""
    rope = cfg.rope
    scaling = None
    if rope.rope_type != "default":
        scaling = {"rope_type": rope.rope_type, "factor": rope.factor}
        if rope.rope_type == "llama3":
            scaling |= {
                "low_freq_factor": rope.low_freq_factor,
                "high_freq_factor": rope.high_freq_factor,
                "original_max_position_embeddings": rope.original_max_position_embeddings,
            }
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_head,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": rope.theta,
        "rope_scaling": scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": cfg.param_dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id)
        if isinstance(cfg.eos_token_id, tuple)
        else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.model_type == "llama":
        if cfg.qkv_bias != cfg.o_bias:
            raise ModelConfigError("llama models have bias on q/k/v and o together, or on none.")
        hf |= {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}
    elif cfg.model_type == "qwen2" and not cfg.qkv_bias:
        # HF Qwen2 always has q/k/v biases: without them the export would not load back.
        raise ModelConfigError(
            "qwen2 models have q/k/v biases (qkv_bias=True); a model without them exports as "
            "model_type 'llama'."
        )
    elif cfg.model_type == "qwen3":
        hf["attention_bias"] = cfg.qkv_bias
    windows = cfg.sliding_windows
    if windows is not None:
        sizes = {w for w in windows if w is not None}
        if len(sizes) != 1:
            raise ModelConfigError("HF configs support a single sliding-window size.")
        size = sizes.pop()
        if cfg.model_type == "mistral":
            hf["sliding_window"] = size
        else:
            hf |= {
                "use_sliding_window": True,
                "sliding_window": size,
                "layer_types": [
                    "full_attention" if w is None else "sliding_attention" for w in windows
                ],
            }
    elif cfg.model_type == "mistral":
        hf["sliding_window"] = None
    elif cfg.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    return hf


def read_hf_config(path: str, key: str | None = None) -> dict[str, Any]:
    """Read ``path/config.json`` with a clear error when it is missing or malformed (starting
    with ``key``, the config key that named ``path``, when given)."""
    try:
        return _read_hf_config(os.path.join(path, "config.json"))
    except ModelConfigError as e:
        if key is None:
            raise
        raise ModelConfigError(f"{key}: {e}") from None


def _read_hf_config(file: str) -> dict[str, Any]:
    if not os.path.isfile(file):
        raise ModelConfigError(f"{file} does not exist; expected an HF model directory.")
    try:
        with open(file, encoding="utf-8") as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{file}, line {e.lineno}: invalid JSON ({e.msg}).") from None
    except UnicodeDecodeError:
        raise ModelConfigError(f"{file} is not UTF-8 text; expected a JSON object.") from None
    if not isinstance(hf, dict):
        raise ModelConfigError(f"{file} holds a {type(hf).__name__}; expected a JSON object.")
    return hf
