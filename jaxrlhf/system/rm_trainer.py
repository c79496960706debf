"""`RMTrainer`: Bradley-Terry reward-model training (``launchers/rm.py``).

The model is the ``actor`` group's trunk (``actor.path``, e.g. an SFT export, or a from-scratch
architecture) with a scalar value head and no LM head; a sequence's reward is the head's output
at its last token. Evaluation: ``eval/accuracy`` (r_chosen > r_rejected), ``eval/margin``,
``eval/loss`` on held-out pairs. Export: an HF sequence classifier at
``<output_dir>/hf_reward_model`` that PPO loads with ``reward_model.path``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxrlhf.data.sft import ExampleTable, PairExample, load_pair_table
from jaxrlhf.interfaces import PackedBatch, run_train_step
from jaxrlhf.interfaces.rm import RMLossSpec, pack_pairs, rm_eval, rm_microbatch_loss
from jaxrlhf.system.reward_model import save_reward_model
from jaxrlhf.system.specs import optimizer_spec
from jaxrlhf.system.supervised import SupervisedTrainer


class RMTrainer(SupervisedTrainer):
    """Pairwise (Bradley-Terry) training of a scalar reward model; see the module docstring."""

    name = "rm"
    value_head = True

    @property
    def max_seq_len(self) -> int:
        return self.cfg.rm.max_seq_len

    def load_tables(self) -> tuple[ExampleTable, ExampleTable | None]:
        return (
            load_pair_table(self.cfg, self.tokenizer, "train"),
            load_pair_table(self.cfg, self.tokenizer, "eval"),
        )

    def pack(self, examples: list[PairExample]) -> tuple[PackedBatch, dict[str, np.ndarray]]:
        return pack_pairs(
            [e.chosen for e in examples], [e.rejected for e in examples],
            max_tokens_per_mb=self.max_tokens_per_mb, row_len=self.row_len,
            rows_multiple=self.batch_shards, pack=self.cfg.rm.packing,
        )  # fmt: skip

    def train_on(self, examples: list[PairExample]) -> dict[str, Any]:
        packed, pairs = self.pack(examples)
        self.state, metrics = run_train_step(
            rm_microbatch_loss, self.state, packed, pairs, cfg=self.handle.config,
            spec=RMLossSpec(), opt=optimizer_spec(self.cfg.actor.optimizer),
            total_steps=self.total, mesh=self.mesh,
        )  # fmt: skip
        return metrics | {"seq_tokens": packed.real_tokens()}

    def eval_metrics(self) -> dict[str, float]:
        examples = self.eval_examples()
        packed, pairs = self.pack(examples)
        metrics = rm_eval(self.state.params, self.handle.config, packed, pairs, mesh=self.mesh)
        return {f"eval/{k}": v for k, v in metrics.items()}

    def export(self) -> str:
        path = os.path.join(self.cfg.experiment.output_dir, "hf_reward_model")
        return save_reward_model(self.model_handle(), path, tokenizer=self.tokenizer)
