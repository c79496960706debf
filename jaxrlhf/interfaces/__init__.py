"""Model function calls (MFCs) on the train mesh: jitted, sharded steps over packed batches.

- training: one step for every model kind, `run_train_step(mb_loss, state, packed, ...)` over
  the pure `train_step` (compiled by `compile_train_step`): gradient accumulation over
  micro-batches in one `lax.scan`, exact global loss normalisation, one clipped AdamW update,
  state donated. Each kind supplies its micro-batch loss and frozen `LossSpec`: the actor
  (`actor_microbatch_loss`, `ActorLossSpec`), the critic (`critic_microbatch_loss`,
  `CriticLossSpec`), SFT (`sft.sft_microbatch_loss`, `sft.SFTLossSpec`) and the reward model
  (`rm.rm_microbatch_loss`, `rm.RMLossSpec`);
- inference: one step, `run_inference(mb_fn, params, cfg, packed, ...)` (compiled by
  `compile_inference`), behind `compute_logprobs` (reference / proximal log-probs),
  `compute_values` and `compute_scores` (reward model);
- data layout: `pack_sequences` (first-fit-decreasing packing into fixed-shape micro-batches)
  and `unpack` / `unpack_scalars` to get per-sequence results back; `ShapeFloors` keeps a run's
  packed shapes (and so its compiled steps) steady.

Nothing here reads the configuration: specs (`ActorLossSpec`, `CriticLossSpec`,
`optim.OptimizerSpec`) are built from it in the system layer (`jaxrlhf.system.specs`).
Compiled steps are cached per (loss, spec, config, mesh, batch shape); bucketed shapes keep
their number small. Per-token arrays are token-aligned: entry t scores token t from position
t − 1.
"""

from jaxrlhf.interfaces.actor import ActorLossSpec, actor_microbatch_loss
from jaxrlhf.interfaces.critic import CriticLossSpec, compute_values, critic_microbatch_loss
from jaxrlhf.interfaces.inference import compile_inference, run_inference
from jaxrlhf.interfaces.microbatch import batch_shardings, put_batch
from jaxrlhf.interfaces.packing import (
    PackedBatch,
    ShapeFloors,
    bucket_size,
    pack_sequences,
    sequences_from_padded,
    unpack,
    unpack_scalars,
)
from jaxrlhf.interfaces.reference import compute_logprobs
from jaxrlhf.interfaces.reward import compute_scores
from jaxrlhf.interfaces.state import ParamLayout, TrainState, init_train_state, state_shardings
from jaxrlhf.interfaces.train import (
    LossSpec,
    accumulate_gradients,
    batch_denominators,
    batch_gradients,
    compile_train_step,
    run_train_step,
    train_step,
)

__all__ = [
    "ActorLossSpec",
    "CriticLossSpec",
    "LossSpec",
    "PackedBatch",
    "ParamLayout",
    "ShapeFloors",
    "TrainState",
    "accumulate_gradients",
    "actor_microbatch_loss",
    "batch_denominators",
    "batch_gradients",
    "batch_shardings",
    "bucket_size",
    "compile_inference",
    "compile_train_step",
    "compute_logprobs",
    "compute_scores",
    "compute_values",
    "critic_microbatch_loss",
    "init_train_state",
    "pack_sequences",
    "put_batch",
    "run_inference",
    "run_train_step",
    "sequences_from_padded",
    "state_shardings",
    "train_step",
    "unpack",
    "unpack_scalars",
]
