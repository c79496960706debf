"""Reward-model training: ``python launchers/rm.py --config configs/rm_toy.yaml [key=value ...]``.

Parse the config, build the trainer, run, and report held-out pairwise accuracy before and
after. The result is exported as an HF sequence classifier (``<output_dir>/hf_reward_model``)
that PPO scores responses with: ``reward_model.enabled=true reward_model.path=<export>``.
"""

from __future__ import annotations

import sys

from jaxrlhf.cli import main_guard, parse_cli


@main_guard
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, default_config="configs/rm_toy.yaml")

    from jaxrlhf.config import config_to_yaml
    from jaxrlhf.logging import format_eval_table
    from jaxrlhf.system.rm_trainer import RMTrainer

    print(config_to_yaml(cfg))
    trainer = RMTrainer(cfg)  # a bad dataset: main_guard prints one 'data error:' line
    with trainer.logger:
        summary = trainer.run()
    before, after = summary["before"], summary["after"]
    keys = ("eval/accuracy", "eval/margin", "eval/loss")
    shown = lambda ev: {k: v for k, v in ev.items() if k in keys}
    if before:
        print(format_eval_table(shown(before), shown(after)))
        print(f"eval accuracy: {before['eval/accuracy']:.3f} -> {after['eval/accuracy']:.3f} "
              f"({summary['steps']} steps, {summary['seconds']:.0f} s)")  # fmt: skip
    print(f"exported: {summary['export']}  (PPO: reward_model.enabled=true "
          f"reward_model.path={summary['export']})")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
