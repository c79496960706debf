"""Seconds per GRPO actor update: the jitted jaxrlhf actor step vs a PyTorch transformers train
step with the same weights, loss and AdamW, timed alternately in one run.

Bench model (Qwen2-shaped): 4 layers, hidden 512, intermediate 1408, 8 heads, 2 kv heads,
head_dim 64, vocab 32768, tied embeddings, float32. Batch: 64 sequences of 64 prompt + 64
response tokens (groups of 8 with GRPO advantages), micro-batches of 8 sequences, gradients
accumulated over the 8 micro-batches, clipped to norm 1, one AdamW step. Loss: clipped PPO
surrogate (ε = 0.2) + 0.04 · k3 KL to a reference, token mean over the batch; entropy is
computed as a metric on both sides.

    python benchmarks/train_step.py [--iters 3]
    python benchmarks/train_step.py --mfu   # GPU: Qwen2.5-0.5B shape, bf16 compute, 4k tokens

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from jaxrlhf.algorithms import group_advantages
from jaxrlhf.interfaces import (
    ActorLossSpec,
    actor_microbatch_loss,
    compute_logprobs,
    init_train_state,
    pack_sequences,
    run_train_step,
    unpack,
)
from jaxrlhf.models import RopeConfig, TransformerConfig, init_model
from jaxrlhf.optim import OptimizerSpec

EPS_CLIP, KL_COEF, GROUP = 0.2, 0.04, 8
OPT = OptimizerSpec(lr=1e-6, weight_decay=0.01, grad_clip=1.0)
SPEC = ActorLossSpec(eps_clip=EPS_CLIP, kl_coef=KL_COEF, kl_estimator="k3")


def grpo_batch(n_seqs: int, prompt: int, response: int, vocab: int, seed: int = 0):
    """Random token sequences, response loss masks and group-normalised advantages."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (n_seqs, prompt + response)).astype(np.int32)
    mask = np.zeros(ids.shape, np.float32)
    mask[:, prompt:] = 1.0
    scores = rng.integers(0, 2, n_seqs).astype(np.float32)
    adv = np.asarray(group_advantages(scores, GROUP, "grpo"))[:, None] * mask
    return ids, mask, adv


def _time_alternating(fns: dict, iters: int) -> dict[str, list[float]]:
    times = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def jax_update_fn(cfg: TransformerConfig, params, ids, mask, adv, mb_seqs: int, spec=SPEC):
    """Pack the batch, compute π_old / π_ref once; return a closure running one update (it
    returns the step's metrics on the host), and π_old / π_ref as [N, T] arrays."""
    seqs = list(ids)
    tokens_per_mb = mb_seqs * ids.shape[1]
    probe = pack_sequences(seqs, max_tokens_per_mb=tokens_per_mb)
    old = unpack(probe, compute_logprobs(params, cfg, probe)["logp"])
    rng = np.random.default_rng(1)
    ref = [x + rng.normal(0, 0.05, x.shape).astype(np.float32) for x in old]
    fields = {"loss_mask": list(mask), "advantages": list(adv), "old_logp": old, "ref_logp": ref}
    packed = pack_sequences(seqs, fields, max_tokens_per_mb=tokens_per_mb)
    state = [init_train_state(params, cfg, OPT)]

    def update():
        state[0], metrics = run_train_step(
            actor_microbatch_loss, state[0], packed, cfg=cfg, spec=spec, opt=OPT
        )
        return jax.device_get(metrics)

    return update, np.stack([np.pad(x, (0, ids.shape[1] - len(x))) for x in old]), np.stack(ref)


def torch_update_fn(model, ids, mask, adv, old, ref, mb_seqs: int):
    """The same objective in PyTorch: micro-batches, global token mean, clip, AdamW."""
    import torch

    decay = [p for n, p in model.named_parameters() if not n.endswith(("norm.weight", "bias"))]
    no_decay = [p for n, p in model.named_parameters() if n.endswith(("norm.weight", "bias"))]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPT.weight_decay}, {"params": no_decay}],
        lr=OPT.lr,
        betas=OPT.betas,
        eps=OPT.eps,
        weight_decay=0.0,
    )
    t = {k: torch.tensor(v) for k, v in dict(ids=ids, mask=mask, adv=adv, old=old, ref=ref).items()}
    t["ids"] = t["ids"].long()
    total = t["mask"][:, 1:].sum()

    def update():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        entropy_sum, loss_sum = torch.zeros(()), torch.zeros(())
        for start in range(0, ids.shape[0], mb_seqs):
            sl = slice(start, start + mb_seqs)
            logits = model(input_ids=t["ids"][sl]).logits
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            logp = log_probs.gather(-1, t["ids"][sl, 1:, None]).squeeze(-1)
            m, a = t["mask"][sl, 1:], t["adv"][sl, 1:]
            ratio = torch.exp(logp - t["old"][sl, 1:])
            surr = torch.maximum(-a * ratio, -a * ratio.clamp(1 - EPS_CLIP, 1 + EPS_CLIP))
            log_rho = logp - t["ref"][sl, 1:]
            kl = torch.expm1(-log_rho) + log_rho
            loss = ((surr + KL_COEF * kl) * m).sum() / total
            loss.backward()
            with torch.no_grad():
                entropy = -(log_probs.exp() * log_probs).sum(-1)
                entropy_sum += (entropy * m).sum()
                loss_sum += loss
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.grad_clip)
        optimizer.step()
        return {"loss": loss_sum, "entropy": entropy_sum / total, "grad_norm": grad_norm}

    return update


def cpu_benchmark(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from jaxrlhf.models import from_pretrained

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=4096,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        handle = from_pretrained(d, dtype="float32")
    ids, mask, adv = grpo_batch(args.seqs, args.prompt, args.response, hf_cfg.vocab_size)
    jax_update, old, ref = jax_update_fn(handle.config, handle.params, ids, mask, adv, args.mb)
    torch_update = torch_update_fn(model, ids, mask, adv, old, ref, args.mb)

    start = time.perf_counter()
    first_jax = jax_update()  # compiles
    compile_s = time.perf_counter() - start
    first_torch = torch_update()  # warm-up
    check = {f"first_update_{k}": [float(f"{float(first_jax[k]):.6g}"), float(f"{float(v):.6g}")]
             for k, v in first_torch.items()}  # fmt: skip
    times = _time_alternating({"jaxrlhf": jax_update, "torch": torch_update}, args.iters)
    jax_s, torch_s = statistics.median(times["jaxrlhf"]), statistics.median(times["torch"])
    return {
        "benchmark": "train_step",
        "model": "qwen2 4L h512 i1408 8q/2kv hd64 v32768 tied f32",
        "sequences": args.seqs,
        "tokens_per_sequence": args.prompt + args.response,
        "micro_batch": args.mb,
        "device": jax.devices()[0].platform,
        "cpus": os.cpu_count(),
        "jaxrlhf_s_per_update": round(jax_s, 3),
        "torch_s_per_update": round(torch_s, 3),
        "speedup_vs_torch": round(torch_s / jax_s, 3),
        "jaxrlhf_times": [round(x, 3) for x in times["jaxrlhf"]],
        "torch_times": [round(x, 3) for x in times["torch"]],
        "jaxrlhf_first_call_s": round(compile_s, 1),
        **check,  # [jaxrlhf, torch]: the two objectives agree
    }


def model_flops_per_token(cfg: TransformerConfig, seq: int) -> float:
    """Training FLOPs per token: 6 × matmul params (LM head included) + causal attention."""
    D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.dim_head
    H, K, V, L = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size, cfg.num_layers
    matmul = L * (D * H * E * 2 + D * K * E * 2 + 3 * D * F) + D * V
    attention = L * 2 * 2 * H * E * seq / 2  # QK^T and PV, half the keys on average
    return 6 * matmul + 3 * attention


def mfu_benchmark(args: argparse.Namespace) -> dict:
    cfg = TransformerConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=32768, rope=RopeConfig(theta=1e6),
        param_dtype=args.param_dtype, compute_dtype="bfloat16", remat=args.remat,
    )  # fmt: skip
    seq = args.mfu_seq
    params = init_model(cfg, seed=0).params
    ids, mask, adv = grpo_batch(args.mfu_seqs, seq // 2, seq - seq // 2, cfg.vocab_size)
    spec = ActorLossSpec(eps_clip=EPS_CLIP, kl_coef=KL_COEF, logits_chunk=args.logits_chunk)
    update, _, _ = jax_update_fn(cfg, params, ids, mask, adv, args.mfu_mb, spec)
    start = time.perf_counter()
    update()
    compile_s = time.perf_counter() - start
    times = _time_alternating({"jaxrlhf": update}, args.iters)["jaxrlhf"]
    step_s = statistics.median(times)
    tokens = args.mfu_seqs * seq
    flops = model_flops_per_token(cfg, seq) * tokens
    return {
        "benchmark": "train_step_mfu",
        "model": f"qwen2.5-0.5b shape, bf16 compute, {args.param_dtype} params",
        "device": str(jax.devices()[0].device_kind),
        "sequences": args.mfu_seqs,
        "tokens_per_sequence": seq,
        "micro_batch": args.mfu_mb,
        "remat": args.remat,
        "s_per_update": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_s": round(flops / step_s / 1e12, 2),
        "mfu_vs_peak": round(flops / step_s / (args.peak_tflops * 1e12), 4),
        "peak_tflops_assumed": args.peak_tflops,
        "first_call_s": round(compile_s, 1),
        "times": [round(x, 4) for x in times],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--mb", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--mfu", action="store_true", help="GPU MFU run instead of the CPU bench")
    ap.add_argument("--mfu-seq", type=int, default=4096)
    ap.add_argument("--mfu-seqs", type=int, default=8)
    ap.add_argument("--mfu-mb", type=int, default=1)
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--logits-chunk", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200)")
    args = ap.parse_args()
    result = mfu_benchmark(args) if args.mfu else cpu_benchmark(args)
    for key, value in result.items():
        if not isinstance(value, list):
            print(f"{key:>24}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
