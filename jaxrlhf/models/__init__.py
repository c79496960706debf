"""Decoder-only transformers (Llama / Qwen2 / Qwen3 / Mistral), sharding and HF checkpoint I/O."""

from jaxrlhf.models.build import build_model, transformer_config
from jaxrlhf.models.config import (
    ModelConfigError,
    RopeConfig,
    TransformerConfig,
    config_from_hf,
    config_to_hf,
)
from jaxrlhf.models.handle import ModelHandle, init_model, param_shardings
from jaxrlhf.models.hf_io import from_pretrained, save_pretrained
from jaxrlhf.models.safetensors_io import CheckpointError
from jaxrlhf.models.sharding import MeshError, make_mesh
from jaxrlhf.models.transformer import (
    forward_logits,
    hidden_states,
    init_params,
    lm_logits,
    positions_from_mask,
    value_outputs,
)

__all__ = [
    "CheckpointError",
    "MeshError",
    "ModelConfigError",
    "ModelHandle",
    "RopeConfig",
    "TransformerConfig",
    "build_model",
    "config_from_hf",
    "config_to_hf",
    "forward_logits",
    "from_pretrained",
    "hidden_states",
    "init_model",
    "init_params",
    "lm_logits",
    "make_mesh",
    "param_shardings",
    "positions_from_mask",
    "save_pretrained",
    "transformer_config",
    "value_outputs",
]
