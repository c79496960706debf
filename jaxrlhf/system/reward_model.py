"""Reward models on disk: an HF ``*ForSequenceClassification`` directory (trunk + ``score``).

`save_reward_model` writes the trunk with `save_pretrained` and the value head as the HF
sequence-classification head ``score.weight`` ``[1, D]`` (plus a non-standard ``score.bias``
only when it is not 0; Bradley-Terry training never moves it, the loss being shift-invariant),
sharded over two safetensors files with an index, so `transformers` and `from_pretrained` both
read it. The directory appears only when complete. `load_reward_model` reads it back for PPO.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxrlhf.config import ConfigError
from jaxrlhf.models import ModelHandle, from_pretrained, param_shardings, save_pretrained
from jaxrlhf.models.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsReader,
    write_safetensors,
)

HEAD_WEIGHT, HEAD_BIAS = "score.weight", "score.bias"
TRUNK_FILE, HEAD_FILE = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def save_reward_model(handle: ModelHandle, path: str, *, tokenizer: Any = None) -> str:
    """Write a value-head model as an HF sequence-classification directory at ``path``."""
    cfg, params = handle.config, handle.params
    if "value_head" not in params:
        raise ValueError("save_reward_model: the model has no value head.")
    trunk = {k: v for k, v in params.items() if k != "value_head"}
    if "lm_head" not in trunk and not cfg.tie_word_embeddings:
        cfg = cfg.replace(tie_word_embeddings=True)  # no LM head to write: the trunk alone
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        inner = os.path.join(tmp, "model")
        trunk_handle = ModelHandle(cfg, trunk, handle.mesh, handle.hf_config, handle.source_path)
        save_pretrained(trunk_handle, inner, tokenizer=tokenizer)
        _add_head(inner, handle, tokenizer)
        if os.path.exists(path):
            os.rename(path, os.path.join(tmp, "old"))  # removed with tmp below
        os.rename(inner, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _add_head(directory: str, handle: ModelHandle, tokenizer: Any) -> None:
    """Add ``score`` to a single-file trunk directory: two shards, an index, the HF config of a
    sequence classifier."""
    if not os.path.isfile(os.path.join(directory, SINGLE_FILE)):
        raise ValueError("save_reward_model: the trunk is too large for one file; not supported.")
    head = jax.device_get(handle.params["value_head"])
    kernel = np.asarray(head["kernel"], np.float32).reshape(1, -1)
    bias = np.asarray(head["bias"], np.float32).reshape(1)
    dtype = np.dtype(jax.numpy.dtype(handle.config.param_dtype))
    tensors = [(HEAD_WEIGHT, kernel.shape, dtype, lambda: kernel)]
    if bias[0] != 0:
        tensors.append((HEAD_BIAS, bias.shape, dtype, lambda: bias))
    os.rename(os.path.join(directory, SINGLE_FILE), os.path.join(directory, TRUNK_FILE))
    write_safetensors(os.path.join(directory, HEAD_FILE), tensors)
    with open(os.path.join(directory, TRUNK_FILE), "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        names = [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    weight_map = {n: TRUNK_FILE for n in names} | {t[0]: HEAD_FILE for t in tensors}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    config_file = os.path.join(directory, "config.json")
    with open(config_file) as f:
        hf = json.load(f)
    family = hf["architectures"][0].removesuffix("ForCausalLM")
    hf["architectures"] = [f"{family}ForSequenceClassification"]
    hf["id2label"], hf["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    pad = getattr(tokenizer, "pad_token_id", None)
    if hf.get("pad_token_id") is None and pad is not None:
        hf["pad_token_id"] = int(pad)  # HF scores the last non-pad token
    with open(config_file, "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)


def load_reward_model(
    path: str,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    mesh: Mesh | None = None,
) -> ModelHandle:
    """A reward model written by `save_reward_model` (or any HF sequence classifier with one
    label), with its ``score`` head as the value head."""
    if not os.path.isdir(path):
        raise ConfigError(f"reward_model.path {path!r} is not a directory.")
    reader = SafetensorsReader(path)
    if HEAD_WEIGHT not in reader:
        raise ConfigError(
            f"reward_model.path {path!r} has no reward head (tensor {HEAD_WEIGHT!r}); point it "
            "at a reward model exported by launchers/rm.py."
        )
    handle = from_pretrained(path, dtype, compute_dtype=compute_dtype, mesh=mesh, lm_head=False,
                             value_head=True, key="reward_model.path")  # fmt: skip
    hidden = handle.config.hidden_size
    if reader.shape(HEAD_WEIGHT) not in ((1, hidden), (hidden,)):
        raise ConfigError(
            f"reward_model.path {path!r}: {HEAD_WEIGHT} has shape {reader.shape(HEAD_WEIGHT)}; "
            f"a scalar reward head needs [1, {hidden}]."
        )
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    head = {
        "kernel": np.asarray(reader.get(HEAD_WEIGHT), np_dtype).reshape(hidden),
        "bias": np.asarray(reader.get(HEAD_BIAS) if HEAD_BIAS in reader else 0.0, np_dtype)
        .reshape(()),
    }  # fmt: skip
    shardings = param_shardings(handle.config, mesh, lm_head=False, value_head=True)
    handle.params["value_head"] = jax.device_put(head, shardings["value_head"])
    return handle
