"""Tokens/s of the jitted jaxrlhf forward vs transformers' PyTorch forward, same weights, one run.

Qwen2-shaped model: 4 layers, hidden 512, intermediate 1408, 8 heads, 2 kv heads, head_dim 64,
vocab 32768, tied embeddings; batch 8 x 512 tokens, float32, logits for every position.

    python benchmarks/forward.py [--batch 8] [--seq 512] [--iters 3]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from jaxrlhf.models import from_pretrained


def _time(fn, iters: int) -> float:
    fn()  # warm-up (and compilation for JAX)
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    config = transformers.Qwen2Config(
        vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=4096,
    )  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
    mask = np.ones_like(ids)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        handle = from_pretrained(d, dtype="float32")

    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)

    def torch_forward():
        with torch.inference_mode():
            return hf(input_ids=ids_t, attention_mask=mask_t).logits

    def jax_forward():
        return jax.block_until_ready(handle.logits(ids, mask))

    jax_s = _time(jax_forward, args.iters)
    torch_s = _time(torch_forward, args.iters)
    diff = float(np.abs(np.asarray(jax_forward()) - torch_forward().numpy()).max())
    tokens = args.batch * args.seq
    result = {
        "benchmark": "forward",
        "model": "qwen2 4L h512 i1408 8q/2kv hd64 v32768 tied f32",
        "batch": args.batch,
        "seq": args.seq,
        "device": jax.devices()[0].platform,
        "jaxrlhf_tokens_per_s": round(tokens / jax_s, 1),
        "torch_tokens_per_s": round(tokens / torch_s, 1),
        "speedup_vs_torch": round(torch_s / jax_s, 3),
        "max_abs_logit_diff": diff,
    }
    print(f"jaxrlhf {result['jaxrlhf_tokens_per_s']:>10} tok/s")
    print(f"torch   {result['torch_tokens_per_s']:>10} tok/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
