"""HF checkpoints in and out: `from_pretrained` and `save_pretrained`.

Loading streams: each parameter is built with `jax.make_array_from_callback`, whose callback
reads only the layers and slices that one device shard needs from memory-mapped safetensors, so
the host never holds two full copies of the weights. Saving fetches one HF tensor at a time and
writes into a temporary directory that replaces the target only when complete.

A model is named by a local directory or a hub name (`resolve_model_dir`). A hub name is taken
from the HF cache or downloaded, never waited on: with ``HF_HUB_OFFLINE`` or
``TRANSFORMERS_OFFLINE`` set only the cache is used, and otherwise the hub must answer a
connection within `HUB_PROBE_TIMEOUT_S` seconds (else the cache, else one sentence saying so).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxrlhf.errors import ConfigError
from jaxrlhf.models.config import (
    ModelConfigError,
    TransformerConfig,
    config_from_hf,
    config_to_hf,
    read_hf_config,
)
from jaxrlhf.models.handle import ModelHandle, param_shardings
from jaxrlhf.models.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    SafetensorsReader,
    write_safetensors,
)
from jaxrlhf.models.transformer import param_shapes

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_FILES = _TOKENIZER_FILES[:6]  # those a tokenizer is read from (the rest: templates)

HUB_PROBE_TIMEOUT_S = 3.0  # a hub that does not accept a connection this fast counts as offline
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_HUB_FILES = ["config.json", "*.safetensors", INDEX_FILE, *_TOKENIZER_FILES]  # what is fetched
# huggingface_hub's rule for repo ids: "name" or "owner/name" of word characters, "-" and "."
_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]+\b$")


def resolve_model_dir(name_or_path: str, key: str = "path") -> str:
    """The local directory of the model ``name_or_path`` names (``key``: the config key it came
    from, for the message): the directory itself, or a hub name's snapshot of the files this
    package reads (config, safetensors, tokenizer), from the HF cache or downloaded.

    Offline (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set) only the cache is used; online
    the hub must accept a connection within `HUB_PROBE_TIMEOUT_S` or the cache is used. A path
    that does not exist, an empty directory, a file, or a hub name that cannot be had is a
    `ConfigError` naming ``key`` and the value.
    """
    path = os.path.expanduser(name_or_path)
    expected = "expected an HF model directory (config.json, model.safetensors, tokenizer files)"
    if os.path.isdir(path):
        if not os.listdir(path):
            raise ConfigError(f"{key}: {path} is an empty directory; {expected}.")
        return path
    if os.path.exists(path):
        raise ConfigError(f"{key}: {path} is a file; {expected} or a hub model name.")
    if len(name_or_path) > 96 or not _REPO_ID.match(name_or_path) or ".." in name_or_path:
        raise ConfigError(f"{key}: {path} does not exist; {expected} or a hub model name.")
    return _hub_snapshot(name_or_path, key)


def hub_offline_var(*also: str) -> str | None:
    """The offline variable (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``also``) that is
    set, if any."""
    from huggingface_hub import constants

    true = constants.ENV_VARS_TRUE_VALUES
    return next((v for v in (*_OFFLINE_VARS, *also) if os.environ.get(v, "").upper() in true), None)


def hub_unreachable() -> str | None:
    """None if the HF hub (``HF_ENDPOINT``) accepts a connection within `HUB_PROBE_TIMEOUT_S`,
    else a phrase saying why not (``"the hub https://huggingface.co cannot be reached
    (...)"``)."""
    from huggingface_hub import constants

    reason = _probe(constants.ENDPOINT)
    return None if reason is None else f"the hub {constants.ENDPOINT} {reason}"


def _hub_snapshot(name: str, key: str) -> str:
    from huggingface_hub import constants

    cached = _cached_snapshot(name)
    offline = hub_offline_var()
    if cached is not None and offline:
        return cached
    missing = (
        f"{key}: {name!r} is not a local directory and not in the HF cache "
        f"({constants.HF_HUB_CACHE})"
    )
    fix = f"download it first (hf download {name}) or set {key} to a local directory"
    if offline:
        raise ConfigError(f"{missing}, and {offline} is set; {fix}.")
    unreachable = hub_unreachable()
    if unreachable is not None:
        if cached is not None:
            return cached
        raise ConfigError(f"{missing}, and {unreachable}; {fix}.")
    try:
        return _download(name)
    except (OSError, ValueError) as e:  # HfHubHTTPError (not found, gated) is an OSError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"{key}: {name!r} is not a local directory, and downloading it from the hub failed "
            f"({first})."
        ) from None


def _cached_snapshot(name: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=_HUB_FILES, local_files_only=True)
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or a bad name
        return None


@functools.cache  # the tokenizer and the model resolve the same name
def _download(name: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=_HUB_FILES)


def _probe(endpoint: str) -> str | None:
    """None if ``endpoint``'s host accepts a TCP connection within `HUB_PROBE_TIMEOUT_S`, else
    why not. Name resolution has no timeout of its own, so the probe runs in a daemon thread."""
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"cannot be reached ({e.strerror or e})")

    thread = threading.Thread(target=connect, daemon=True, name="hub-probe")
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S)
    return outcome[0] if outcome else f"did not answer within {HUB_PROBE_TIMEOUT_S:g} s"


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One parameter leaf and the HF tensor(s) it comes from."""

    path: tuple[str, ...]  # path in our params tree
    hf_name: str  # HF tensor name; "{i}" is the layer index for stacked layer params
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _specs(cfg: TransformerConfig, lm_head: bool) -> list[_Spec]:
    D, H, K, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_head
    same = lambda a: a
    tr = lambda a: a.T

    def proj_in(heads):  # HF [heads*E, D] <-> ours [D, heads, E]
        return (lambda a: a.T.reshape(D, heads, E), lambda a: a.reshape(D, heads * E).T)

    def bias_in(heads):  # HF [heads*E] <-> ours [heads, E]
        return (lambda a: a.reshape(heads, E), lambda a: a.reshape(heads * E))

    # HF o_proj [D, H*E] <-> ours [H, E, D]
    o_proj = (lambda a: a.T.reshape(H, E, D), lambda a: a.reshape(H * E, D).T)
    pre = "model.layers.{i}."
    table: list[tuple[tuple[str, ...], str, tuple]] = [
        (("embed",), "model.embed_tokens.weight", (same, same)),
        (("final_norm",), "model.norm.weight", (same, same)),
        (("layers", "input_norm"), pre + "input_layernorm.weight", (same, same)),
        (("layers", "post_norm"), pre + "post_attention_layernorm.weight", (same, same)),
        (("layers", "q"), pre + "self_attn.q_proj.weight", proj_in(H)),
        (("layers", "k"), pre + "self_attn.k_proj.weight", proj_in(K)),
        (("layers", "v"), pre + "self_attn.v_proj.weight", proj_in(K)),
        (("layers", "o"), pre + "self_attn.o_proj.weight", o_proj),
        (("layers", "gate"), pre + "mlp.gate_proj.weight", (tr, tr)),
        (("layers", "up"), pre + "mlp.up_proj.weight", (tr, tr)),
        (("layers", "down"), pre + "mlp.down_proj.weight", (tr, tr)),
    ]
    if cfg.qkv_bias:
        table += [
            (("layers", "q_bias"), pre + "self_attn.q_proj.bias", bias_in(H)),
            (("layers", "k_bias"), pre + "self_attn.k_proj.bias", bias_in(K)),
            (("layers", "v_bias"), pre + "self_attn.v_proj.bias", bias_in(K)),
        ]
    if cfg.o_bias:
        table.append((("layers", "o_bias"), pre + "self_attn.o_proj.bias", (same, same)))
    if cfg.mlp_bias:
        table += [
            (("layers", f"{n}_bias"), pre + f"mlp.{n}_proj.bias", (same, same))
            for n in ("gate", "up", "down")
        ]
    if cfg.qk_norm:
        table += [
            (("layers", "q_norm"), pre + "self_attn.q_norm.weight", (same, same)),
            (("layers", "k_norm"), pre + "self_attn.k_norm.weight", (same, same)),
        ]
    if lm_head and not cfg.tie_word_embeddings:
        table.append((("lm_head",), "lm_head.weight", (tr, tr)))
    return [_Spec(path, name, fns[0], fns[1]) for path, name, fns in table]


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _load_leaf(
    reader: SafetensorsReader,
    spec: _Spec,
    shape: tuple[int, ...],
    sharding: jax.sharding.Sharding,
    dtype: np.dtype,
    num_layers: int,
) -> jax.Array:
    expected = shape[1:] if spec.per_layer else shape
    expected_hf = spec.to_hf(np.empty(expected, np.bool_)).shape  # compared before converting
    names = (
        [spec.hf_name.format(i=i) for i in range(num_layers)] if spec.per_layer else [spec.hf_name]
    )
    for name in names:  # fail before any device work, naming the file and the tensor
        if reader.shape(name) != expected_hf:
            config = os.path.join(reader.directory, "config.json")
            raise CheckpointError(
                f"{reader.file(name)}: tensor {name!r} has shape {reader.shape(name)}, but "
                f"{config} implies {expected_hf}; the weights and the config do not match."
            )

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        if spec.per_layer:
            layers = range(num_layers)[index[0]]
            parts = [spec.to_ours(reader.get(names[i]))[index[1:]].astype(dtype) for i in layers]
            return np.stack(parts)
        return np.asarray(spec.to_ours(reader.get(names[0]))[index], dtype=dtype)

    return jax.make_array_from_callback(shape, sharding, shard)


def from_pretrained(
    path: str,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    mesh: Mesh | None = None,
    remat: bool = False,
    lm_head: bool = True,
    value_head: bool = False,
    key: str | None = None,
) -> ModelHandle:
    """Load an HF model (Llama / Qwen2 / Qwen3 / Mistral; a directory or a hub name, see
    `resolve_model_dir`) into a `ModelHandle`.

    ``dtype`` is the parameter dtype; ``compute_dtype`` defaults to it. With a ``mesh``, every
    parameter is placed directly into its shards. ``value_head=True`` adds a zero-initialised
    scalar head (a critic or reward model started from a causal LM). ``key``: the config key
    that named ``path``, which a bad directory's error starts with.
    """
    path = resolve_model_dir(path, key or "path")
    try:
        hf = read_hf_config(path)
        cfg = config_from_hf(
            hf, param_dtype=dtype, compute_dtype=compute_dtype, remat=remat,
            where=os.path.join(path, "config.json"),
        )  # fmt: skip
        reader = SafetensorsReader(path)
        shapes = param_shapes(cfg, lm_head=lm_head, value_head=value_head)
        shardings = param_shardings(cfg, mesh, lm_head=lm_head, value_head=value_head)
        np_dtype = np.dtype(jax.numpy.dtype(dtype))
        params: dict[str, Any] = {}
        for spec in _specs(cfg, lm_head):
            leaf = _load_leaf(
                reader, spec, _get(shapes, spec.path), _get(shardings, spec.path), np_dtype,
                cfg.num_layers,
            )  # fmt: skip
            _set(params, spec.path, leaf)
    except (ModelConfigError, CheckpointError) as e:
        if key is None:
            raise
        raise type(e)(f"{key}: {e}") from None
    if value_head:
        head_shardings = shardings["value_head"]
        params["value_head"] = {
            name: jax.device_put(np.zeros(shapes["value_head"][name], np_dtype), sh)
            for name, sh in head_shardings.items()
        }
    return ModelHandle(config=cfg, params=params, mesh=mesh, hf_config=hf, source_path=path)


def _fetch(leaf: jax.Array, layer: int | None) -> np.ndarray:
    part = leaf if layer is None else leaf[layer]
    if not part.is_fully_addressable:
        part = multihost_utils.process_allgather(part, tiled=True)
    return np.asarray(jax.device_get(part))


def save_pretrained(
    handle: ModelHandle,
    path: str,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 4 * 1024**3,
    tokenizer: Any = None,
) -> None:
    """Write ``handle`` as an HF directory that `transformers.AutoModelForCausalLM` loads.

    Tensors are fetched one at a time; the directory appears only when complete (written to a
    temporary sibling and renamed). Tokenizer files are copied from the source directory, or
    written from ``tokenizer`` when given. In multi-process runs every process must call this;
    process 0 writes.
    """
    cfg = handle.config
    if "lm_head" not in handle.params and not cfg.tie_word_embeddings:
        raise CheckpointError(
            "this model has no LM head (a value model); it cannot be saved as a causal LM."
        )
    out_dtype = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
    entries = []
    for spec in _specs(cfg, lm_head=True):
        leaf = _get(handle.params, spec.path)
        layers = range(cfg.num_layers) if spec.per_layer else [None]
        for i in layers:
            name = spec.hf_name.format(i=i) if spec.per_layer else spec.hf_name
            shape = spec.to_hf(np.empty(leaf.shape[1:] if spec.per_layer else leaf.shape)).shape
            produce = lambda leaf=leaf, i=i, spec=spec: spec.to_hf(_fetch(leaf, i))
            entries.append((name, shape, out_dtype, produce))

    writer = jax.process_index() == 0
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = (
        tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
        if writer
        else None
    )
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[1])) * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    for file, shard in zip(names, shards, strict=True):
        if writer:
            write_safetensors(os.path.join(tmp, file), shard)
        else:  # participate in the collectives of non-addressable fetches
            for *_, produce in shard:
                produce()
    if not writer:
        return
    if len(shards) > 1:
        total = sum(int(np.prod(e[1])) * out_dtype.itemsize for e in entries)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {e[0]: f for f, s in zip(names, shards, strict=True) for e in s},
        }
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    hf = dict(handle.hf_config or {}) | config_to_hf(cfg)
    hf.pop("rope_parameters", None)  # config_to_hf wrote the 4.x fields, read by 4.x and 5.x
    hf.pop("dtype", None)
    hf["torch_dtype"] = str(jax.numpy.dtype(out_dtype))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    elif handle.source_path:
        for name in _TOKENIZER_FILES:
            src = os.path.join(handle.source_path, name)
            if os.path.isfile(src):
                shutil.copy2(src, tmp)
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + "-", dir=parent)
        os.rename(path, os.path.join(old, "model"))
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old)
