"""Samples/s of asynchronous vs synchronous PPO on this CPU, heavy-tailed response lengths.

Workload: the toy policy (``configs/toy_ppo.yaml``) after only ``--sft-steps`` (1) SFT warm-start
step, GRPO on the built-in arithmetic prompts (exact-answer reward, no reference model),
``--batch`` prompts x 8 samples, up to ``--new-tokens`` (256) new tokens at temperature 1, at
``--lr`` (1e-4, that of ``configs/toy_async_ppo.yaml``). The barely warmed-up policy answers in
about 27 tokens (median) but p90 is about 124 and about 2 % run to the 256 cap: heavy-tailed
lengths (median / p90 / max are reported), the regime where a synchronous batch waits for its
longest response. At this learning rate the policy, and so the length distribution, barely
moves over the benchmark's steps, so both modes see the same workload (compare their
``response_len_*``); at 3e-4 the two runs drift apart within 30 steps.

* ``sync``: `PPOCoordinator` in one process with every core: generate (the whole batch waits for
  its longest response), reward, update, weight sync.
* ``async``: `PPOCoordinator` (`AsyncGeneration`) with ``async_ppo.generator=process``: the
  trainer process is pinned to the last core, the generation server runs in its own process on
  the other core(s) with its own XLA device (XLA:CPU runs every device of one process on a
  shared thread pool, so a separate process is the real disaggregation here; on accelerators
  the thread + sub-mesh path is). η = ``--eta``; the server refills decode slots as responses
  finish; decoupled loss.

Each mode runs in a fresh subprocess: ``--warmup`` steps (compilation), then ``--steps`` timed
steps. ``samples_per_s`` = samples trained by the timed steps / their wall time (async: the
lower of consumption and production, since the buffer starts the window full).
``median_step_samples_per_s`` (samples per step / median step seconds) is the steady state;
``compile_s`` / ``gen_compile_s`` are the seconds spent compiling inside the timed window by the
trainer and by the generator process (packed shapes only grow, `ShapeFloors`, and the server
prefills in fixed-row calls, so both are usually 0 after the warm-up). The load average is
recorded around each run: this CPU is shared, so compare figures from one run only.

    python benchmarks/async_vs_sync.py [--steps 30] [--eta 2] [--set KEY=VALUE ...]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from _child import run_json_child  # noqa: E402

TARGET = 1.6


def overrides(args: argparse.Namespace, mode: str, out: str) -> list[str]:
    common = [
        f"experiment.output_dir={out}", f"experiment.mode={mode}",
        f"experiment.total_steps={args.warmup + args.steps}", "experiment.eval_every=0",
        "experiment.seed=0", f"sft_warmup.steps={args.sft_steps}", "logging.progress=false",
        "checkpoint.save_every=0", f"data.batch_size={args.batch}", "generation.n_samples=8",
        f"generation.max_new_tokens={args.new_tokens}", "generation.decode_chunk=8",
        f"generation.max_concurrent={args.batch * 8}", "ref.enabled=false",
        f"actor.optimizer.lr={args.lr}",
        f"actor.max_position_embeddings={max(256, 16 + args.new_tokens)}", "data.eval_size=16",
    ]  # fmt: skip
    common += args.set
    if mode == "async":
        common += [
            "async_ppo.generator=process", "async_ppo.allocation=gen=1,train=1",
            f"experiment.max_head_offpolicyness={args.eta}", "async_ppo.proximal=fused",
            "algorithm.decoupled_loss=true", "algorithm.behav_imp_weight_cap=5.0",
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
    from jaxrlhf.system.coordinator import PPOCoordinator

    coord = PPOCoordinator(cfg)  # experiment.mode picks the generation strategy
    rows, lens = [], []
    start = None
    produced = 0.0
    gen_compile = 0.0
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                start = time.perf_counter()
                if args.child == "async":
                    produced = -coord.generation.producer.counters()["samples"]
                    gen_compile = -coord.generation.server.health().get("compile_s", float("nan"))
            m = coord.train_step()
            rows.append({k: float(v) for k, v in m.items() if isinstance(v, int | float)})
            if i >= args.warmup:
                lens += coord.last_trajectories.response_lens.tolist()
        wall = time.perf_counter() - start
        if args.child == "async":
            produced += coord.generation.producer.counters()["samples"]
            gen_compile += coord.generation.server.health().get("compile_s", float("nan"))
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
        # compilation inside the timed window: the trainer's (sync: everything), the generator
        # process's (async)
        "compile_s": sum(r["perf/compile_s"] for r in timed),
        "gen_compile_s": gen_compile,
        "step_s_median": statistics.median(r["perf/step_s"] for r in timed),
        "step_s": [round(r["perf/step_s"], 3) for r in rows],
        "reward_curve": [r["reward/mean"] for r in rows],
        "response_len_curve": [round(r["response_len/mean"], 2) for r in rows],
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
            ("steps", "warmup", "eta", "batch", "new-tokens", "sft-steps", "lr")]  # fmt: skip
    cmd += [f"--set={kv}" for kv in args.set]
    # async: the trainer on the last core, its generator process on the others
    return run_json_child(cmd, pin_last_core=mode == "async", timeout=args.timeout)


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
    ap.add_argument("--sft-steps", type=int, default=1, help="SFT warm-start steps")
    ap.add_argument("--lr", type=float, default=1e-4, help="RL learning rate (both modes)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mode")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for both modes (repeatable)")  # fmt: skip
    ap.add_argument("--plot", default="runs/async_vs_sync.png", help="reward curves plot")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    results = {"cpu_count": os.cpu_count(), "eta": args.eta, "batch": args.batch,
               "new_tokens": args.new_tokens, "steps": args.steps, "sft_steps": args.sft_steps,
               "lr": args.lr, "set": args.set}  # fmt: skip
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
