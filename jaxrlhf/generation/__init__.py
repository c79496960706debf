"""Generation engine: jitted prefill / decode over a KV cache, batch `generate`, a continuous-
batching `GenerationServer` with interruptible weight updates, and a `GenerationManager`."""

from jaxrlhf.generation.generate import GenerationOutput, generate, sampler_for
from jaxrlhf.generation.manager import GenerationManager
from jaxrlhf.generation.sampler import ChunkOutput, RowState, Sampler
from jaxrlhf.generation.server import GenerationServer, RequestHandle
from jaxrlhf.generation.types import (
    Completion,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
)

__all__ = [
    "ChunkOutput",
    "Completion",
    "GenerationManager",
    "GenerationOutput",
    "GenerationServer",
    "InvalidRequestError",
    "RequestHandle",
    "RequestOutput",
    "RowState",
    "Sampler",
    "SamplingParams",
    "generate",
    "sampler_for",
]
