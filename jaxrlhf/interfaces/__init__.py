"""Model function calls (MFCs) on the train mesh: jitted, sharded steps over packed batches.

- training: `actor_train` / `critic_train` (host entries) over the pure `actor_train_step` /
  `critic_train_step`: gradient accumulation over micro-batches in one `lax.scan`, exact global
  loss normalisation, one clipped AdamW update, state donated;
- inference: `compute_logprobs` (reference / proximal log-probs), `compute_values`,
  `compute_scores` (reward model);
- data layout: `pack_sequences` (first-fit-decreasing packing into fixed-shape micro-batches)
  and `unpack` / `unpack_scalars` to get per-sequence results back; `ShapeFloors` keeps a run's
  packed shapes (and so its compiled steps) steady.

Compiled steps are cached per (config, mesh, batch shape); bucketed shapes keep their number
small. Per-token arrays are token-aligned: entry t scores token t from position t − 1.
"""

from jaxrlhf.interfaces.actor import (
    ActorLossSpec,
    actor_microbatch_loss,
    actor_train,
    actor_train_step,
    compile_actor_train_step,
)
from jaxrlhf.interfaces.critic import (
    CriticLossSpec,
    compile_critic_train_step,
    compile_values,
    compute_values,
    critic_microbatch_loss,
    critic_train,
    critic_train_step,
)
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
from jaxrlhf.interfaces.reference import compile_logprobs, compute_logprobs
from jaxrlhf.interfaces.reward import compile_scores, compute_scores
from jaxrlhf.interfaces.state import ParamLayout, TrainState, init_train_state, state_shardings
from jaxrlhf.interfaces.train import accumulate_gradients, batch_denominators, train_step

__all__ = [
    "ActorLossSpec",
    "CriticLossSpec",
    "PackedBatch",
    "ParamLayout",
    "ShapeFloors",
    "TrainState",
    "accumulate_gradients",
    "actor_microbatch_loss",
    "actor_train",
    "actor_train_step",
    "batch_denominators",
    "batch_shardings",
    "bucket_size",
    "compile_actor_train_step",
    "compile_critic_train_step",
    "compile_logprobs",
    "compile_scores",
    "compile_values",
    "compute_logprobs",
    "compute_scores",
    "compute_values",
    "critic_microbatch_loss",
    "critic_train",
    "critic_train_step",
    "init_train_state",
    "pack_sequences",
    "put_batch",
    "sequences_from_padded",
    "state_shardings",
    "train_step",
    "unpack",
    "unpack_scalars",
]
