"""Supervised fine-tuning: ``python launchers/sft.py --config configs/sft_toy.yaml [k=v ...]``.

Parse the config, build the trainer, run, and report the held-out loss before and after. The
result is exported as an HF directory (``<output_dir>/hf_actor``) that a PPO config starts from
with ``actor.path``.
"""

from __future__ import annotations

import sys

from jaxrlhf.cli import main_guard, parse_cli


@main_guard
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, default_config="configs/sft_toy.yaml")

    from jaxrlhf.config import config_to_yaml
    from jaxrlhf.logging import format_eval_table
    from jaxrlhf.system.sft_trainer import SFTTrainer

    print(config_to_yaml(cfg))
    trainer = SFTTrainer(cfg)  # a bad dataset: main_guard prints one 'data error:' line
    with trainer.logger:
        summary = trainer.run()
    before, after = summary["before"], summary["after"]
    shown = lambda ev: {k: v for k, v in ev.items() if k in ("eval/loss", "eval/perplexity")}
    if before:
        print(format_eval_table(shown(before), shown(after)))
        print(f"eval loss: {before['eval/loss']:.3f} -> {after['eval/loss']:.3f} "
              f"({summary['steps']} steps, {summary['seconds']:.0f} s)")  # fmt: skip
    print(f"exported: {summary['export']}  (PPO: actor.path={summary['export']})")
    return summary


if __name__ == "__main__":
    main()
