"""The toy experiment at test sizes: one tiny model and a quiet logger on `configs/toy_ppo.yaml`,
shared by the tests that build a real coordinator."""

from pathlib import Path

from jaxrlhf.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
# 1 layer, hidden 32, 2 query heads over 1 KV head: compiles in seconds on a CPU.
TINY_MODEL = (
    "actor.vocab_size=80", "actor.hidden_size=32", "actor.intermediate_size=64",
    "actor.num_layers=1", "actor.num_heads=2", "actor.num_kv_heads=1",
    "experiment.eval_every=0", "logging.progress=false",
)  # fmt: skip


def toy_config(output_dir: Path | str, *overrides: str) -> Config:
    """`configs/toy_ppo.yaml` with `TINY_MODEL`, writing to ``output_dir``, then ``overrides``."""
    return load_config(
        ROOT / "configs" / "toy_ppo.yaml",
        [*TINY_MODEL, f"experiment.output_dir={output_dir}", *overrides],
    )
