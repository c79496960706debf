"""`SFTTrainer`: supervised fine-tuning of the ``actor`` model (``launchers/sft.py``).

Loss: mean NLL of response tokens (prompt tokens masked), micro-batches of at most
``actor.max_tokens_per_mb`` tokens, packed with segment ids (``sft.packing``) or one sequence per
row. Evaluation: ``eval/loss`` and ``eval/perplexity`` on the held-out examples. Export: an HF
causal LM at ``<output_dir>/hf_actor`` that a PPO config loads with ``actor.path``.
"""

from __future__ import annotations

import math
from typing import Any

from jaxrlhf.data.sft import ExampleTable, SFTExample, load_sft_table
from jaxrlhf.interfaces import PackedBatch, pack_sequences, run_train_step
from jaxrlhf.interfaces.sft import SFTLossSpec, sft_eval, sft_microbatch_loss
from jaxrlhf.system.specs import optimizer_spec
from jaxrlhf.system.supervised import SupervisedTrainer


class SFTTrainer(SupervisedTrainer):
    """Response-only NLL training of a causal LM; see the module docstring."""

    name = "sft"

    @property
    def max_seq_len(self) -> int:
        return self.cfg.sft.max_seq_len

    def load_tables(self) -> tuple[ExampleTable, ExampleTable | None]:
        return (
            load_sft_table(self.cfg, self.tokenizer, "train"),
            load_sft_table(self.cfg, self.tokenizer, "eval"),
        )

    def pack(self, examples: list[SFTExample]) -> PackedBatch:
        return pack_sequences(
            [e.ids for e in examples], {"loss_mask": [e.loss_mask for e in examples]},
            max_tokens_per_mb=self.max_tokens_per_mb, row_len=self.row_len,
            rows_multiple=self.batch_shards, pack=self.cfg.sft.packing,
        )  # fmt: skip

    def train_on(self, examples: list[SFTExample]) -> dict[str, Any]:
        packed = self.pack(examples)
        self.state, metrics = run_train_step(
            sft_microbatch_loss, self.state, packed, cfg=self.handle.config, spec=SFTLossSpec(),
            opt=optimizer_spec(self.cfg.actor.optimizer), total_steps=self.total, mesh=self.mesh,
        )  # fmt: skip
        return metrics | {"seq_tokens": packed.real_tokens()}

    def eval_metrics(self) -> dict[str, float]:
        examples = self.eval_examples()
        nll, tokens = sft_eval(self.state.params, self.handle.config, self.pack(examples),
                               mesh=self.mesh)  # fmt: skip
        loss = nll / max(tokens, 1.0)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 80.0)),
                "eval/examples": len(examples)}  # fmt: skip

    def export(self) -> str:
        return self.checkpointer.export_hf(self.model_handle(), tokenizer=self.tokenizer)
