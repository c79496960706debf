"""Log-prob inference (MFCs ``ref_inf`` and ``actor_inf``): per-token log-probs of a packed
batch under some params — the frozen reference policy, or the actor before its update (the
proximal log-probs of decoupled PPO, and π_old of synchronous PPO).

Output ``logp`` ``[M, S, T]`` is token-aligned (entry t scores token t from position t − 1;
0 at token 0, beyond each length and in empty slots); `packing.unpack` returns it per sequence.
"""

from __future__ import annotations

import functools

from jax.sharding import Mesh

from jaxrlhf.interfaces.inference import Outputs, run_inference
from jaxrlhf.interfaces.microbatch import Batch, microbatch_logprobs
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params


def logprob_outputs(
    params: Params, mb: Batch, *, cfg: TransformerConfig, mesh: Mesh | None = None,
    with_entropy: bool = False, **options: float | int | None,
) -> Outputs:  # fmt: skip
    """``{"logp": [S, T]}`` (and ``"entropy"``) for one micro-batch; ``options``: the
    ``temperature`` and ``chunk_size`` of `microbatch_logprobs`."""
    logp, entropy = microbatch_logprobs(params, cfg, mb, with_entropy=with_entropy, mesh=mesh,
                                        **options)  # fmt: skip
    return {"logp": logp} | ({"entropy": entropy} if with_entropy else {})


# Host entry: ``compute_logprobs(params, cfg, packed, *, mesh=None, temperature=1.0,
# chunk_size=None, with_entropy=False)`` -> token log-probs (grid ``[M, S, T]`` device arrays).
compute_logprobs = functools.partial(run_inference, logprob_outputs)
