"""Tunix's JAX sampler on an HF checkpoint (greedy, forced full length) as a timing server.

Started by `benchmarks/generate.py` in a subprocess with its own ``PYTHONPATH`` (Tunix's pins may
clash with ours). It compiles, prints a JSON "ready" line, then answers each stdin line holding a
number of new tokens with one JSON line of seconds. Tunix's `Sampler` takes strings, so token ids
map one-to-one to words ``t<id>``; EOS is forbidden so every row runs to full length.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np


class IdTokenizer:
    """Words ``t<id>`` <-> token ids, one to one; no BOS (bos_id 0 is falsy for Tunix)."""

    def __init__(self, eos: int, pad: int):
        self._eos, self._pad = eos, pad

    def encode(self, text: str, **_) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(f"t{int(i)}" for i in ids)

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return self._pad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--prompt", type=int, required=True)
    ap.add_argument("--new", type=int, required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from jax.sharding import AxisType
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen2 import model as qwen2_model
    from tunix.models.qwen2 import params as qwen2_params

    with open(f"{args.model_dir}/config.json") as f:
        hf = json.load(f)
    dtype = jax.numpy.dtype(args.dtype)
    config = qwen2_model.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf.get("rope_theta", 1e6)),
        norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=hf["tie_word_embeddings"],
        shd_config=qwen2_model.ShardingConfig.get_default_sharding(is_sampling=True),
        dtype=dtype,
        param_dtype=dtype,
    )
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto, AxisType.Auto))
    with _use_mesh(mesh):
        model = qwen2_params.create_model_from_safe_tensors(
            args.model_dir, config, mesh=mesh, dtype=dtype
        )
    vocab = hf["vocab_size"]
    eos, pad = vocab - 1, 0
    sampler = sampler_lib.Sampler(
        model,
        IdTokenizer(eos, pad),
        sampler_lib.CacheConfig(
            cache_size=args.prompt + args.new,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
        ),
    )
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(1, vocab - 1, (args.batch, args.prompt))
    prompts = [" ".join(f"t{i}" for i in row) for row in ids]

    def run(new: int) -> tuple[float, int]:
        start = time.perf_counter()
        with _use_mesh(mesh):
            out = sampler(
                prompts, max_generation_steps=new, max_prompt_length=args.prompt,
                eos_tokens=[eos], forbidden_tokens=[eos], temperature=0.0,
            )  # fmt: skip
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - start, sum(len(t) for t in out.tokens)

    # Serve timing requests from the parent ("<new_tokens>" per line) so that its engines and
    # this one are measured interleaved, under the same machine load.
    first, tokens = run(args.new)
    first_one, _ = run(1)
    warm, _ = run(args.new)
    warm_one, _ = run(1)
    compile_s = first - warm + first_one - warm_one
    _reply({"ready": True, "compile_s": compile_s, "tokens": tokens, "tunix_version": _version()})
    for line in sys.stdin:
        seconds, tokens = run(int(line))
        _reply({"seconds": seconds, "tokens": tokens})


def _reply(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _use_mesh(mesh):
    return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


def _version() -> str:
    from importlib.metadata import version

    try:
        return version("google-tunix")
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
