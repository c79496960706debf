"""Does async PPO learn as well as sync? The toy experiment in both modes, same seed and samples.

Runs ``configs/toy_async_ppo.yaml`` in both modes: as written (async, η = ``--eta``, decoupled
loss, generator in its own process, trainer pinned to the last core) and with
``experiment.mode=sync`` (plain PPO: the decoupled weights are 1 in sync mode), all else equal,
for ``--steps`` RL steps each (equal numbers of samples: steps x 32 prompts x 8), evaluating the
held-out reward every ``--eval-every`` steps, once per seed in ``--seeds``, and plots the
held-out curves against samples in one figure (the seed mean bold, each seed thin).
``--set key=value`` overrides a config key in both modes (repeatable). Acceptance: seed-mean
final held-out rewards within 0.05 (one seed's final swings by about ±0.1, so one run decides
little).

    python benchmarks/async_learning.py [--steps 800] [--seeds 0,1,2] [--set KEY=VALUE ...]

The last line printed is one JSON object with every curve, the finals and their differences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from _child import run_json_child  # noqa: E402

CONFIG = "toy_async_ppo.yaml"
MODE_OVERRIDES = {
    "sync": ["experiment.mode=sync", "algorithm.decoupled_loss=false"],
    "async": [],
}


def interval_means(history: list[dict], key: str, every: int) -> list[float]:
    """Means of ``key`` over consecutive windows of ``every`` steps (absent: skipped)."""
    values = [h[key] for h in history if key in h]
    every = every if every > 0 else max(len(values), 1)  # no evaluations: one window
    return [sum(w) / len(w) for w in (values[i : i + every] for i in range(0, len(values), every))]


def child(args: argparse.Namespace) -> None:
    from jaxrlhf.config import load_config

    out = tempfile.mkdtemp(prefix=f"async_learning_{args.child}_")
    cfg = load_config(
        os.path.join(ROOT, "configs", CONFIG),
        [f"experiment.total_steps={args.steps}", f"experiment.eval_every={args.eval_every}",
         f"experiment.output_dir={out}", "logging.progress=false", "checkpoint.save_every=0",
         f"experiment.seed={args.seed}", f"experiment.max_head_offpolicyness={args.eta}",
         *MODE_OVERRIDES[args.child], *args.set],
    )  # fmt: skip
    from jaxrlhf.system.coordinator import PPOCoordinator

    coord = PPOCoordinator(cfg)  # experiment.mode picks the generation strategy
    start = time.perf_counter()
    with coord.logger:
        coord.run()
    per_step = cfg.data.batch_size * cfg.generation.n_samples
    print(json.dumps({
        "mode": args.child,
        "seconds": time.perf_counter() - start,
        "eval": [[e["step"] * per_step, e["eval/reward"]] for e in coord.eval_history],
        # per eval interval: mean training reward, mean staleness, and the mean per-token
        # |log π_θ − log π_behaviour| (how far the trained policy has moved from the one that
        # generated its batch; numerics only in sync mode)
        **{key: interval_means(coord.history, metric, args.eval_every) for key, metric in (
            ("train_reward", "reward/mean"), ("staleness_mean", "async/staleness_mean"),
            ("logprob_gap", "actor/logprob_gap"))},
    }))  # fmt: skip


def run_child(args: argparse.Namespace, mode: str, seed: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, f"--seed={seed}",
           f"--steps={args.steps}", f"--eval-every={args.eval_every}", f"--eta={args.eta}",
           *(f"--set={kv}" for kv in args.set)]  # fmt: skip
    # async: the trainer on the last core, its generator process on the others
    return run_json_child(cmd, pin_last_core=mode == "async", timeout=args.timeout)


def mean_curve(runs: list[dict]) -> list[list[float]]:
    """Seed-mean held-out curve ([samples, reward] pairs); runs share evaluation points."""
    curves = [r["eval"] for r in runs]
    return [[pts[0][0], sum(p[1] for p in pts) / len(pts)] for pts in zip(*curves, strict=True)]


def plot(results: dict, modes: tuple[str, ...], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for color, m in zip(("C0", "C1"), modes, strict=False):
        for run in results[m]["runs"]:
            xs, ys = zip(*run["eval"], strict=True)
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
        xs, ys = zip(*results[m]["mean_eval"], strict=True)
        ax.plot(xs, ys, color=color, marker="o", linewidth=2, label=f"{m} (mean of seeds)")
    ax.set_xlabel("samples trained on")
    ax.set_ylabel("held-out reward (greedy)")
    ax.set_title(f"toy arithmetic: sync vs async PPO (η = {results['eta']})")
    ax.legend()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=("sync", "async"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run each")
    ap.add_argument("--eta", type=int, default=2, help="max_head_offpolicyness of async")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for both modes (repeatable)")  # fmt: skip
    ap.add_argument("--modes", default="sync,async", help="which runs (the plot needs both)")
    ap.add_argument("--plot", default="runs/async_learning.png")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per run")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = tuple(args.modes.split(","))
    results: dict = {"steps": args.steps, "seeds": seeds, "eta": args.eta, "set": args.set}
    for mode in modes:
        results[mode] = {"runs": []}
    for seed in seeds:  # interleaved, so that load drifts hit both modes alike
        for mode in modes:
            run = run_child(args, mode, seed)
            results[mode]["runs"].append(run | {"seed": seed})
            print(f"seed {seed} {mode}: " + (
                f"final {run['eval'][-1][1]:.3f} in {run['seconds']:.0f} s"
                if "eval" in run else "FAILED\n" + run["stderr"]), flush=True)  # fmt: skip
    ok = all("eval" in r for m in modes for r in results[m]["runs"])
    if ok:
        for m in modes:
            runs = results[m]["runs"]
            results[m]["mean_eval"] = mean_curve(runs)
            results[m]["finals"] = [r["eval"][-1][1] for r in runs]
            results[m]["mean_final"] = sum(results[m]["finals"]) / len(runs)
            results[m]["mean_seconds"] = sum(r["seconds"] for r in runs) / len(runs)
    if ok and set(modes) >= {"sync", "async"}:
        gap = results["async"]["mean_final"] - results["sync"]["mean_final"]
        results["final_gap"] = gap
        results["per_seed_gaps"] = [
            a - s for a, s in zip(results["async"]["finals"], results["sync"]["finals"],
                                  strict=True)
        ]  # fmt: skip
        results["within_0.05"] = abs(gap) <= 0.05
        results["plot"] = plot(results, ("sync", "async"), args.plot)
        print(
            f"seed-mean final held-out reward: sync {results['sync']['mean_final']:.3f}, "
            f"async {results['async']['mean_final']:.3f} (gap {gap:+.3f}, bound 0.05)"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
