"""Samples/s of asynchronous vs synchronous PPO on this CPU, heavy-tailed response lengths.

Workload: the toy policy (``configs/toy_ppo.yaml``) after only ``--sft-steps`` SFT warm-start
steps, GRPO on the built-in arithmetic prompts (exact-answer reward, no reference model),
``--batch`` prompts x 8 samples, up to ``--new-tokens`` new tokens at temperature 1. The barely
warmed-up policy usually answers in a few tokens but sometimes rambles on: heavy-tailed
response lengths (median / p90 / max are reported), the regime where a synchronous batch waits
for its longest response.

* ``sync``: `PPOCoordinator` in one process with every core: generate (the whole batch waits for
  its longest response), reward, update, weight sync.
* ``async``: `AsyncPPOCoordinator` with ``async_ppo.generator=process``: the trainer process is
  pinned to the last core, the generation server runs in its own process on the other core(s)
  with its own XLA device (XLA:CPU runs every device of one process on a shared thread pool, so a
  separate process is the real disaggregation here; on accelerators the thread + sub-mesh path
  is). η = ``--eta``; the server refills decode slots as responses finish.

Each mode runs in a fresh subprocess: ``--warmup`` steps (compilation), then ``--steps`` timed
steps. ``samples_per_s`` = samples trained by the timed steps / their wall time (async: the
lower of consumption and production, since the buffer starts the window full); packed batches
of new shapes still compile inside the window, in both modes, so ``median_step_samples_per_s``
(samples per step / median step seconds) is also given as the steady state. The load average is
recorded around each run: this CPU is shared, so compare figures from one run only.

    python benchmarks/async_vs_sync.py [--steps 30] [--eta 2] [--plot runs/async_vs_sync.png]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
TARGET = 1.6


def overrides(args: argparse.Namespace, mode: str, out: str) -> list[str]:
    common = [
        f"experiment.output_dir={out}", f"experiment.mode={mode}",
        f"experiment.total_steps={args.warmup + args.steps}", "experiment.eval_every=0",
        "experiment.seed=0", f"sft_warmup.steps={args.sft_steps}", "logging.progress=false",
        "checkpoint.save_every=0", f"data.batch_size={args.batch}", "generation.n_samples=8",
        f"generation.max_new_tokens={args.new_tokens}", "generation.decode_chunk=8",
        f"generation.max_concurrent={args.batch * 8}",
        "algorithm.decoupled_loss=true", "algorithm.behav_imp_weight_cap=5.0", "ref.enabled=false",
        f"actor.max_position_embeddings={max(256, 16 + args.new_tokens)}", "data.eval_size=16",
    ]  # fmt: skip
    if mode == "async":
        common += [
            "async_ppo.generator=process", "async_ppo.allocation=gen=1,train=1",
            f"experiment.max_head_offpolicyness={args.eta}", "async_ppo.proximal=fused",
        ]  # fmt: skip
    return common


def child(args: argparse.Namespace) -> None:
    """Run one mode and print its figures as JSON (this process may be pinned)."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    from jaxrlhf.config import load_config

    out = tempfile.mkdtemp(prefix=f"async_vs_sync_{args.child}_")
    cfg = load_config(
        os.path.join(ROOT, "configs", "toy_ppo.yaml"), overrides(args, args.child, out)
    )
    if args.child == "async":
        from jaxrlhf.system.async_ppo import AsyncPPOCoordinator as Coordinator
    else:
        from jaxrlhf.system.coordinator import PPOCoordinator as Coordinator
    coord = Coordinator(cfg)
    rows, lens = [], []
    start = None
    produced = 0.0
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                start = time.perf_counter()
                if args.child == "async":
                    produced = -coord.producer.counters()["samples"]
            m = coord.train_step()
            traj = coord.last_trajectories if args.child == "async" else None
            rows.append({k: float(v) for k, v in m.items() if isinstance(v, int | float)})
            if i >= args.warmup and traj is not None:
                lens += traj.response_lens.tolist()
        wall = time.perf_counter() - start
        if args.child == "async":
            produced += coord.producer.counters()["samples"]
    finally:
        if args.child == "async":
            coord.close()
    timed = rows[args.warmup :]
    samples = args.steps * args.batch * 8
    # Async starts the window with a buffer filled during warm-up: count the slower of the
    # trainer's consumption and the generator's production over the window.
    rate = samples / wall if args.child == "sync" else min(samples, produced) / wall
    result = {
        "mode": args.child,
        "samples_per_s": rate,
        "consumed_per_s": samples / wall,
        # Steady state without compilation outliers (new packed / prefill shapes compile late).
        "median_step_samples_per_s": args.batch
        * 8
        / statistics.median(r["perf/step_s"] for r in timed),
        "wall_s": wall,
        "step_s_median": statistics.median(r["perf/step_s"] for r in timed),
        "step_s": [round(r["perf/step_s"], 3) for r in rows],
        "reward_curve": [r["reward/mean"] for r in rows],
        "response_len_mean": statistics.mean(r["response_len/mean"] for r in timed),
        "response_len_max": max(r["response_len/max"] for r in timed),
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    if lens:
        lens.sort()
        result["response_len_p50_p90_max"] = [lens[len(lens) // 2], lens[9 * len(lens) // 10],
                                              lens[-1]]  # fmt: skip
    if args.child == "async":
        for key in ("async/gen_idle_frac", "async/train_idle_frac", "async/staleness_mean",
                    "async/buffer_depth"):  # fmt: skip
            result[key] = statistics.mean(r[key] for r in timed)
        result["async/staleness_max"] = max(r["async/staleness_max"] for r in timed)
    print(json.dumps(result))


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode]
    cmd += [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
            ("steps", "warmup", "eta", "batch", "new-tokens", "sft-steps")]  # fmt: skip
    n = os.cpu_count() or 1
    if mode == "async" and n > 1:  # trainer on the last core; the generator takes the rest
        cmd = ["taskset", "-c", str(n - 1), *cmd]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"status": "failed", "stderr": proc.stderr[-3000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["loadavg_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return result


def plot(results: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("sync", "async"):
        r = results[mode]
        if "reward_curve" in r:
            ax.plot(range(1, len(r["reward_curve"]) + 1), r["reward_curve"], label=mode)
    ax.set_xlabel("train step (equal samples per step)")
    ax.set_ylabel("mean reward (exact answer)")
    ax.legend()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=("sync", "async"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=30, help="timed train steps per mode")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps (compilation)")
    ap.add_argument("--eta", type=int, default=2, help="max_head_offpolicyness of async")
    ap.add_argument("--batch", type=int, default=16, help="prompts per step (x 8 samples)")
    ap.add_argument("--new-tokens", type=int, default=256, help="max new tokens")
    ap.add_argument("--sft-steps", type=int, default=5, help="SFT warm-start steps")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mode")
    ap.add_argument("--plot", default="runs/async_vs_sync.png", help="reward curves plot")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    results = {"cpu_count": os.cpu_count(), "eta": args.eta, "batch": args.batch,
               "new_tokens": args.new_tokens, "steps": args.steps}  # fmt: skip
    results["sync"] = run_mode(args, "sync")
    results["async"] = run_mode(args, "async")
    s, a = results["sync"], results["async"]
    if "samples_per_s" in s and "samples_per_s" in a:
        results["speedup"] = a["samples_per_s"] / s["samples_per_s"]
        results["speedup_median_step"] = (
            a["median_step_samples_per_s"] / s["median_step_samples_per_s"]
        )
        results["target"] = TARGET
        results["plot"] = plot(results, args.plot)
        print(f"sync {s['samples_per_s']:.1f} samples/s, async {a['samples_per_s']:.1f} "
              f"samples/s: {results['speedup']:.2f}x (target >= {TARGET}x)")  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
