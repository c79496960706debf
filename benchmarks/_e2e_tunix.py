"""Tunix's `GRPOLearner` on a randomly initialised Qwen2 of a given shape: seconds per RL step.

Started by `benchmarks/e2e.py` in a subprocess with Tunix on its ``PYTHONPATH`` (its pins may
clash with ours). One step: 1 prompt x ``--group`` samples of exactly ``--new`` tokens (the EOS id
lies outside the vocabulary, so no row stops early), beta 0 (no reference model), one update per
batch. Token ids map one to one to words ``t<id>`` (Tunix's rollout takes strings). Step times are
the intervals between the learner's pulls of successive batches (generation, rewards, advantages,
the update and the weight sync all happen in between). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from _tunix_peer import IdTokenizer  # same directory: scripts run as files


class TimedBatches:
    """The learner's training data: records the wall time at which each batch is pulled."""

    def __init__(self, prompts: list[str], steps: int):
        self.prompts, self.steps = prompts, steps
        self.pulled: list[float] = []

    def __iter__(self):
        for i in range(self.steps):
            self.pulled.append(time.perf_counter())
            # An array, not a list: the learner repeats each leaf G times with np.repeat.
            yield {"prompts": np.asarray([self.prompts[i % len(self.prompts)]])}


def even_token_reward(prompts, completions, **_) -> list[float]:
    """A cheap reward with spread inside a group: the fraction of even token ids."""
    out = []
    for text in completions:
        ids = [int(w[1:]) for w in text.split()]
        out.append(float(np.mean([i % 2 == 0 for i in ids])) if ids else 0.0)
    return out


class LengthProbe:
    """A metric function that records every completion's length in tokens."""

    def __init__(self):
        self.lengths: list[int] = []

    def __call__(self, prompts, completions, **_) -> dict:
        self.lengths.extend(len(text.split()) for text in completions)
        return {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="JSON: HF Qwen2Config fields")
    ap.add_argument("--prompt-len", type=int, default=6)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    hf = json.loads(args.model)

    import optax
    from flax import nnx
    from jax.sharding import AxisType
    from tunix.models.qwen2 import model as qwen2_model
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    vocab = hf["vocab_size"]
    config = qwen2_model.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=vocab,
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf.get("rope_theta", 10000)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        use_tied_embedding=hf.get("tie_word_embeddings", True),
        dtype=jax.numpy.float32,
        param_dtype=jax.numpy.float32,
    )
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto, AxisType.Auto))
    build_start = time.perf_counter()
    with jax.set_mesh(mesh):
        actor = qwen2_model.Qwen2(config, rngs=nnx.Rngs(args.seed))

    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=args.new,
        max_prompt_length=args.prompt_len,
        kv_cache_size=args.prompt_len + args.new + 8,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        eos_tokens=[vocab],  # never sampled: every row runs to full length
    )
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.adamw(args.lr),
        eval_every_n_steps=10**9,
        max_steps=args.steps + 2,
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=actor,
        reference=None,
        tokenizer=IdTokenizer(eos=vocab, pad=0),
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={role: mesh for role in (rl_cluster_lib.Role.ACTOR,
                                                   rl_cluster_lib.Role.REFERENCE,
                                                   rl_cluster_lib.Role.ROLLOUT)},
            rollout_engine="vanilla",
            offload_to_cpu=False,
            training_config=training,
            rollout_config=rollout,
        ),
    )  # fmt: skip
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster,
        algo_config=grpo_learner.GRPOConfig(
            num_generations=args.group, num_iterations=1, beta=0.0, epsilon=0.2
        ),
        reward_fns=even_token_reward,
        metric_fns=[probe := LengthProbe()],
    )
    build_s = time.perf_counter() - build_start

    rng = np.random.default_rng(args.seed)
    prompts = [" ".join(f"t{i}" for i in rng.integers(1, vocab, args.prompt_len)) for _ in range(8)]
    # One batch more than the steps timed: the interval after the last pull has no end mark.
    data = TimedBatches(prompts, args.steps + 2)
    start = time.perf_counter()
    learner.train(data)
    end = time.perf_counter()
    marks = [*data.pulled, end]
    steps = np.diff(marks).tolist()
    print(json.dumps({
        "status": "ok",
        "first_step_s": steps[0],
        "step_s": steps[1:-1],  # the last interval also holds the learner's shutdown
        "build_s": build_s,
        "updates": int(cluster.actor_trainer.train_steps),
        "completion_len_min": min(probe.lengths),
        "completion_len_max": max(probe.lengths),
        "train_s": end - start,
        "tunix_version": _version("google-tunix"),
        "jax_version": jax.__version__,
    }), flush=True)  # fmt: skip


def _version(dist: str) -> str:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
