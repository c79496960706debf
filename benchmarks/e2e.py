"""Seconds per RL step, end to end: jaxrlhf's sync coordinator vs TRL's and Tunix's GRPO.

Two jaxrlhf workloads, each a `PPOCoordinator.train_step` (generate, reward, advantages, every
train MFC, the weight sync to the sampler):

- ``toy``: ``configs/toy_ppo.yaml`` as shipped: GRPO advantages with the PPO clipped loss, no
  critic, a reference (its KL is logged, ``kl_coef`` 0), 32 prompts x 8 samples x up to 8 new
  tokens, one update per batch (1 epoch x 1 minibatch). Its 70-step SFT warm start runs while
  the coordinator is built, outside the timed steps.
- ``grpo``: the Qwen2-shaped bench model (4 layers, hidden 512, intermediate 1408, 8 heads, 2 kv
  heads, head_dim 64, vocab 32768, tied, float32), random init, 1 prompt x 8 samples x exactly 64
  new tokens (``generation.min_new_tokens=64``), temperature 1, beta (KL) 0 so no reference, one
  update per batch. Prompts come from the built-in arithmetic task (a few tokens each).

The same GRPO step runs in TRL's ``GRPOTrainer`` (``benchmarks/_e2e_trl.py``, PyTorch CPU, its
own venv: ``--trl-python``) and Tunix's ``GRPOLearner`` (``benchmarks/_e2e_tunix.py``, with
``--tunix-path`` prepended to ``PYTHONPATH`` or in ``--tunix-python``'s venv), each a subprocess
with the same model shape, group size, prompt length and response length, random weights. TRL is
run with 1 and with all torch threads and the faster is kept (OpenMP teams collapse when other
processes hold the cores). A peer that cannot run is reported as unavailable, with why.

Every engine: the first step (compilation / warm-up) is reported on its own; the steady state is
the median of the next ``--steps`` steps. The per-MFC seconds (``time/<mfc>``) of jaxrlhf's steps
say where its time goes. The machine's load average is recorded around each part: this CPU is
shared, so compare figures from one run only.

    python benchmarks/e2e.py --trl-python /tmp/bench-trl/bin/python --tunix-path /tmp/tunix_site
    python benchmarks/e2e.py ... --grpo-set actor.max_tokens_per_mb=768   # try a config change

The last line printed is one JSON object with every figure and ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOY_CONFIG = os.path.join(ROOT, "configs", "toy_ppo.yaml")

# The bench model in HF Qwen2Config terms (what the peers build); jaxrlhf gets the same as
# ``actor.*`` overrides.
BENCH_MODEL = dict(
    vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
    rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=256,
)  # fmt: skip
GROUP, NEW_TOKENS = 8, 64
TARGETS = {"trl": 2.0, "tunix": 1.3}  # steps/s over the peer's
REFERENCE_S = {"trl": 6.4, "tunix": 4.4}  # the figures on this CPU


def bench_overrides() -> list[str]:
    m = BENCH_MODEL
    return [
        "experiment.name=e2e_grpo",
        "actor.model_type=qwen2",
        f"actor.vocab_size={m['vocab_size']}",
        f"actor.hidden_size={m['hidden_size']}",
        f"actor.intermediate_size={m['intermediate_size']}",
        f"actor.num_layers={m['num_hidden_layers']}",
        f"actor.num_heads={m['num_attention_heads']}",
        f"actor.num_kv_heads={m['num_key_value_heads']}",
        f"actor.head_dim={m['head_dim']}",
        "actor.tie_word_embeddings=true",
        f"actor.rope_theta={m['rope_theta']}",
        f"actor.max_position_embeddings={m['max_position_embeddings']}",
        "actor.param_dtype=float32",
        "actor.compute_dtype=float32",
        "algorithm.advantage_estimator=grpo",
        "algorithm.policy_loss=ppo",
        "algorithm.kl_coef=0.0",
        "algorithm.kl_in_reward=false",
        "ref.enabled=false",  # beta 0: like the peers, compute no reference log-probs
        "algorithm.ppo_epochs=1",
        "algorithm.n_minibatches=1",
        "data.batch_size=1",
        f"generation.n_samples={GROUP}",
        f"generation.max_new_tokens={NEW_TOKENS}",
        f"generation.min_new_tokens={NEW_TOKENS}",
        "generation.temperature=1.0",
        "generation.top_p=1.0",
    ]


def quiet_overrides(out_dir: str, steps: int) -> list[str]:
    """No evaluation, checkpoint restore, progress bar or metric files: only the step."""
    return [
        f"experiment.output_dir={out_dir}",
        f"experiment.total_steps={steps}",
        "experiment.eval_every=0",
        "checkpoint.resume=false",
        "logging.progress=false",
        "logging.jsonl=false",
        "logging.tensorboard=false",
        "logging.wandb=false",
    ]


def summarize(seconds: list[float]) -> dict:
    return {
        "median_s": statistics.median(seconds),
        "mean_s": statistics.fmean(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "steps": len(seconds),
        "all_s": [round(s, 4) for s in seconds],
    }


# --------------------------------------------------------------------------- jaxrlhf


def run_jaxrlhf(overrides: list[str], steps: int) -> dict:
    """Build a coordinator from the toy config plus ``overrides``; time ``steps`` + 1 steps."""
    from jaxrlhf.config import load_config
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.system.coordinator import PPOCoordinator

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(TOY_CONFIG, overrides + quiet_overrides(out, steps + 1))
        start = time.perf_counter()
        # Step lines go to a buffer; `log` still hands back each step's values with time/<mfc>.
        logger = MetricsLogger.from_config(cfg, stream=io.StringIO())
        coord = PPOCoordinator(cfg, logger=logger)
        build_s = time.perf_counter() - start
        records = []
        for step in range(1, steps + 2):
            metrics = coord.train_step()
            records.append(logger.log(step, metrics))
        logger.close()
        prompt_lens = _prompt_lengths(coord)
    first, steady = records[0], records[1:]
    mfcs = [k for k in first if k.startswith("time/") and k != "time/step"]
    return {
        "status": "ok",
        "build_s": build_s,
        "first_step_s": first["perf/step_s"],
        "steady": summarize([r["perf/step_s"] for r in steady]),
        "first_mfc_s": {k[5:]: first[k] for k in mfcs},
        "mfc_median_s": {k[5:]: statistics.median(r.get(k, 0.0) for r in steady) for k in mfcs},
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steady),
        "response_len_mean": statistics.fmean(r["response_len/mean"] for r in steady),
        "response_len_max": max(r["response_len/max"] for r in steady),
        "prompt_len_mean": prompt_lens,
        "graph": list(coord.graph.order),
        "loadavg_before": load,
        "loadavg_after": os.getloadavg()[0],
    }


def _prompt_lengths(coord, rows: int = 64) -> float:
    """Mean prompt tokens of the task (a fresh iterator: the run's own data order is untouched)."""
    it = coord.train_pipe.iterator()
    lens: list[int] = []
    while len(lens) < rows:
        lens.extend(int(m.sum()) for m in next(it).attention_mask_bt)
    return statistics.fmean(lens)


# --------------------------------------------------------------------------- peers


def run_peer(name: str, cmd: list[str], env: dict | None, timeout: float) -> dict:
    """One peer subprocess; its last stdout line is a JSON object. Never raises."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        return {"status": "unavailable", "reason": f"{e}"}
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "unavailable" if proc.returncode else "failed",
                "reason": f"{name} exited {proc.returncode}: " + " | ".join(tail)}  # fmt: skip
    if not result.get("step_s"):
        return {"status": "failed", "reason": f"{name} reported no steady-state steps"}
    result["steady"] = summarize(result.pop("step_s"))
    result["wall_s"] = time.perf_counter() - start
    result["loadavg_before"], result["loadavg_after"] = load, os.getloadavg()[0]
    return result


def peer_args(prompt_len: int, steps: int) -> list[str]:
    return [
        "--model", json.dumps(BENCH_MODEL), "--prompt-len", str(prompt_len),
        "--group", str(GROUP), "--new", str(NEW_TOKENS), "--steps", str(steps),
    ]  # fmt: skip


def run_trl(python: str | None, prompt_len: int, steps: int, timeout: float) -> dict:
    if python is None:
        return {"status": "unavailable",
                "reason": "no --trl-python (a venv with trl and a CPU torch)"}  # fmt: skip
    script = [python, os.path.join(HERE, "_e2e_trl.py"), *peer_args(prompt_len, steps)]
    runs = {}
    for threads in (0, 1):  # 0: torch's default (all cores)
        runs[threads] = run_peer("trl", [*script, "--threads", str(threads)], None, timeout)
        if runs[threads]["status"] != "ok":
            return runs[threads]
    best = min(runs.values(), key=lambda r: r["steady"]["median_s"])
    best["by_threads"] = {r["torch_threads"]: r["steady"]["median_s"] for r in runs.values()}
    return best


def run_tunix(python: str, path: str | None, prompt_len: int, steps: int,
              timeout: float) -> dict:  # fmt: skip
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))
    cmd = [python, os.path.join(HERE, "_e2e_tunix.py"), *peer_args(prompt_len, steps)]
    result = run_peer("tunix", cmd, env, timeout)
    if result["status"] != "ok" and not path:
        result["reason"] += " (install google-tunix with pip --target DIR; pass --tunix-path DIR)"
    return result


# --------------------------------------------------------------------------- report


def ratios(jax_s: float, peers: dict[str, dict]) -> dict:
    out = {}
    for name, peer in peers.items():
        if peer.get("status") == "ok":
            speedup = peer["steady"]["median_s"] / jax_s
            out[f"speedup_vs_{name}"] = speedup
            out[f"meets_target_vs_{name}"] = speedup >= TARGETS[name]
            out[f"speedup_vs_{name}_reference_s"] = REFERENCE_S[name] / jax_s
    return out


def print_table(result: dict) -> None:
    def row(engine: str, r: dict) -> str:
        if r.get("status") != "ok":
            return f"  {engine:<22} {r.get('status', '-'):>10}  {r.get('reason', '')}"
        s = r["steady"]
        return (f"  {engine:<22} {s['median_s']:10.3f} {s['mean_s']:8.3f} {s['min_s']:8.3f}"
                f" {1 / s['median_s']:8.3f} {r['first_step_s']:10.2f}"
                f"   load {r['loadavg_before']:.1f}->{r['loadavg_after']:.1f}")  # fmt: skip

    print("\nseconds per RL step (steady state: median / mean / min of the steps after the first)")
    print(f"  {'engine':<22} {'median s':>10} {'mean s':>8} {'min s':>8} {'steps/s':>8}"
          f" {'first s':>10}")  # fmt: skip
    print(row("jaxrlhf toy PPO", result["toy"]))
    grpo = result["grpo"]
    print(f"GRPO step: bench model, 1 prompt x {GROUP} samples x {NEW_TOKENS} new tokens, "
          f"prompt ~{result['peer_prompt_len']} tokens, beta 0, 1 update")  # fmt: skip
    print(row("jaxrlhf", grpo["jaxrlhf"]))
    print(row("trl GRPOTrainer", grpo["trl"]))
    print(row("tunix GRPOLearner", grpo["tunix"]))
    r = grpo["ratios"]
    for name in ("trl", "tunix"):
        if f"speedup_vs_{name}" in r:
            ok = "meets" if r[f"meets_target_vs_{name}"] else "MISSES"
            print(f"  vs {name}: {r[f'speedup_vs_{name}']:.2f}x steps/s ({ok} the >= "
                  f"{TARGETS[name]}x target; {r[f'speedup_vs_{name}_reference_s']:.2f}x "
                  f"against the issue's {REFERENCE_S[name]} s)")  # fmt: skip
    for title, r in (("toy PPO", result["toy"]), ("GRPO", grpo["jaxrlhf"])):
        if r.get("status") == "ok":
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r["mfc_median_s"].items())
            print(f"jaxrlhf {title} per-MFC median s: {parts}")
            first = ", ".join(f"{k} {v:.2f}" for k, v in r["first_mfc_s"].items())
            print(f"jaxrlhf {title} first step per-MFC s: {first}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="steady-state steps timed per engine")
    ap.add_argument("--trl-python", default=None, help="python of a venv with trl + CPU torch")
    ap.add_argument("--tunix-python", default=sys.executable, help="python that runs Tunix")
    ap.add_argument("--tunix-path", default=None, help="dir prepended to PYTHONPATH for Tunix")
    ap.add_argument(
        "--grpo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for jaxrlhf's GRPO step (repeatable)",
    )
    ap.add_argument("--no-toy", action="store_true")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--no-tunix", action="store_true")
    ap.add_argument("--peer-timeout", type=float, default=420.0, help="seconds per peer run")
    args = ap.parse_args()

    import jax

    skipped = {"status": "skipped", "reason": "by flag"}
    result: dict = {"platform": jax.devices()[0].platform, "devices": jax.device_count(),
                    "jax_version": jax.__version__, "cpu_count": os.cpu_count()}  # fmt: skip
    result["toy"] = skipped if args.no_toy else run_jaxrlhf([], args.steps)
    jx = run_jaxrlhf(bench_overrides() + args.grpo_set, args.steps)
    jx["extra_overrides"] = args.grpo_set
    prompt_len = max(1, round(jx["prompt_len_mean"]))
    result["peer_prompt_len"] = prompt_len
    trl = skipped if args.no_trl else run_trl(args.trl_python, prompt_len, args.steps,
                                               args.peer_timeout)  # fmt: skip
    tunix = (
        skipped
        if args.no_tunix
        else run_tunix(
            args.tunix_python, args.tunix_path, prompt_len, args.steps, args.peer_timeout
        )
    )
    peers = {"trl": trl, "tunix": tunix}
    result["grpo"] = {"jaxrlhf": jx, **peers,
                      "ratios": ratios(jx["steady"]["median_s"], peers)}  # fmt: skip
    print_table(result)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
