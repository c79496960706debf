"""Synchronous PPO / GRPO: ``python launchers/ppo.py --config configs/X.yaml [key=value ...]``.

Parse the config, build the coordinator, run, and report the held-out reward before and after.
``--print-graph`` prints the dataflow graph of the configured algorithm and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxrlhf.cli import main_guard, parse_cli


@main_guard
def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    print_graph = "--print-graph" in argv
    cfg = parse_cli(
        [a for a in argv if a != "--print-graph"], default_config="configs/toy_ppo.yaml"
    )

    from jaxrlhf.dfg import build_graph

    if print_graph:
        print(build_graph(cfg).describe())
        return {}

    from jaxrlhf.system import distributed

    distributed.initialize(cfg.distributed)  # before anything touches a JAX backend
    summary = distributed.guarded(lambda: _run(cfg))
    distributed.finish()
    return summary


def _run(cfg) -> dict:
    from jaxrlhf.config import config_to_yaml
    from jaxrlhf.errors import RunStopped
    from jaxrlhf.logging import eval_summary_line, format_eval_table, plot_metrics
    from jaxrlhf.system import distributed
    from jaxrlhf.system.coordinator import PPOCoordinator

    if distributed.is_main():
        print(config_to_yaml(cfg))
    # experiment.mode: async overlaps generation and training (docs/async.md)
    coordinator = PPOCoordinator(cfg)
    logger = coordinator.logger
    # Drawn from the whole metrics file, so a resumed run's plot shows its whole history.
    jsonl, png = logger.jsonl_path, Path(cfg.experiment.output_dir) / "metrics.png"
    plot = lambda: plot_metrics(jsonl, png) if distributed.is_main() and jsonl.exists() else None
    with logger:
        try:
            summary = coordinator.run()
        except RunStopped:  # a signal or divergence (one line, main_guard): plot the run so far
            plot()
            raise
    if not distributed.is_main():  # process 0 reports; the others only compute
        return summary
    shown = lambda ev: {k: v for k, v in ev.items() if k in ("eval/reward", "eval/response_len")}
    before, after = summary["before"], summary["after"]
    print(format_eval_table(shown(before), shown(after)))
    if plot() is not None:
        print(f"metrics: {jsonl}  plot: {png}")
    print(eval_summary_line(before["eval/reward"], after["eval/reward"], summary["steps"],
                            summary["seconds"]))  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
