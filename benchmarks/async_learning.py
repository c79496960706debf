"""Does async PPO learn as well as sync? The toy experiment in both modes, same seed and samples.

Runs ``configs/toy_ppo.yaml`` (sync) and ``configs/toy_async_ppo.yaml`` (async, η = ``--eta``,
decoupled loss, generator in its own process, trainer pinned to the last core) for ``--steps`` RL
steps each (equal numbers of samples: steps x 32 prompts x 8), evaluating the held-out reward
every ``--eval-every`` steps, and plots both held-out curves against samples in one figure.
Acceptance: final held-out rewards within 0.05.

    python benchmarks/async_learning.py [--steps 800] [--eval-every 100] [--plot PATH]

The last line printed is one JSON object with both curves and the final difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
CONFIGS = {"sync": "toy_ppo.yaml", "async": "toy_async_ppo.yaml"}


def child(args: argparse.Namespace) -> None:
    from jaxrlhf.config import load_config

    out = tempfile.mkdtemp(prefix=f"async_learning_{args.child}_")
    cfg = load_config(
        os.path.join(ROOT, "configs", CONFIGS[args.child]),
        [f"experiment.total_steps={args.steps}", f"experiment.eval_every={args.eval_every}",
         f"experiment.output_dir={out}", "logging.progress=false", "checkpoint.save_every=0",
         f"experiment.seed={args.seed}"]
        + ([f"experiment.max_head_offpolicyness={args.eta}"] if args.child == "async" else []),
    )  # fmt: skip
    if args.child == "async":
        from jaxrlhf.system.async_ppo import AsyncPPOCoordinator as Coordinator
    else:
        from jaxrlhf.system.coordinator import PPOCoordinator as Coordinator
    coord = Coordinator(cfg)
    start = time.perf_counter()
    with coord.logger:
        coord.run()
    per_step = cfg.data.batch_size * cfg.generation.n_samples
    print(json.dumps({
        "mode": args.child,
        "seconds": time.perf_counter() - start,
        "eval": [[e["step"] * per_step, e["eval/reward"]] for e in coord.eval_history],
        "train_reward": [h.get("reward/mean") for h in coord.history],
        "staleness_mean": [h.get("async/staleness_mean") for h in coord.history
                           if "async/staleness_mean" in h],
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=("sync", "async"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eta", type=int, default=2, help="max_head_offpolicyness of async")
    ap.add_argument("--modes", default="sync,async", help="which runs (the plot needs both)")
    ap.add_argument("--plot", default="runs/async_learning.png")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per mode")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    results: dict = {"steps": args.steps, "seed": args.seed, "eta": args.eta}
    for mode in args.modes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, f"--seed={args.seed}",
               f"--steps={args.steps}", f"--eval-every={args.eval_every}",
               f"--eta={args.eta}"]  # fmt: skip
        n = os.cpu_count() or 1
        if mode == "async" and n > 1:
            cmd = ["taskset", "-c", str(n - 1), *cmd]
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            results[mode] = {"status": "failed", "stderr": proc.stderr[-3000:]}
            continue
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[mode]["loadavg_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    if all("eval" in results.get(m, {}) for m in ("sync", "async")):
        final = {m: results[m]["eval"][-1][1] for m in ("sync", "async")}
        results["final_eval_reward"] = final
        results["final_gap"] = final["async"] - final["sync"]
        results["within_0.05"] = abs(results["final_gap"]) <= 0.05
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
            for m in ("sync", "async"):
                xs, ys = zip(*results[m]["eval"], strict=True)
                ax.plot(xs, ys, marker="o", label=m)
            ax.set_xlabel("samples trained on")
            ax.set_ylabel("held-out reward (greedy)")
            ax.set_title(f"toy arithmetic: sync vs async PPO (η = {args.eta})")
            ax.legend()
            os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
            fig.savefig(args.plot, dpi=100, bbox_inches="tight")
            results["plot"] = args.plot
        except ImportError:
            results["plot"] = None
        print(f"final held-out reward: sync {final['sync']:.3f}, async {final['async']:.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
