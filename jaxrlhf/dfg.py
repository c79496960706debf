"""The RL algorithm as data: model function calls (MFCs) wired into a dataflow graph (DFG).

An MFC is one call of one interface on one model (or, for ``compute`` MFCs, on no model): it
reads named keys of the trajectory batch and writes new ones. Edges are implied by the keys, so
the graph is fully described by its MFC list plus the keys the dataset provides::

    graph = build_graph(cfg)      # validated: raises DataflowError before anything compiles
    for name in graph.order:      # a topological order; graph.stages groups independent MFCs
        mfc = graph[name]
    print(graph.describe())       # what ``launchers/ppo.py --print-graph`` shows

PPO with a critic is ``actor_gen -> rew_inf, ref_inf, critic_inf -> advantages -> actor_train,
critic_train``. GRPO drops the critic; Dr.GRPO / RLOO / REINFORCE++ only change the estimator
option of ``advantages``; ``ref_inf`` exists when ``cfg.use_ref``; ``rm_inf`` (a learned reward
model, whose scores ``advantages`` adds to the rule-based ``scores``) when
``cfg.reward_model.enabled``. Async mode has the same graph, except that ``actor_gen`` takes
finished groups from the generation server (the step's data starts empty, with no dataset keys)
and, with ``algorithm.decoupled_loss`` and ``async_ppo.proximal: recompute``, ``actor_inf``
computes the proximal log-probs (``fused`` takes them inside the single update instead).

An MFC names its implementation by ``interface`` (a name in `MFC_INTERFACES`, e.g. the
``ppo_actor`` interface serves ``generate``, ``inference`` and ``train``) and ``interface_type``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

from jaxrlhf.algorithms import ADVANTAGE_ESTIMATORS, effective_truncation
from jaxrlhf.config import Config, ConfigError
from jaxrlhf.registry import Registry

__all__ = [
    "DATASET_KEYS",
    "INTERFACE_TYPES",
    "MFC",
    "MFC_INTERFACES",
    "ROLES",
    "DataflowError",
    "DataflowGraph",
    "InterfaceType",
    "MFCInputs",
    "MicroBatchSpec",
    "Role",
    "algorithm_label",
    "build_graph",
    "run_graph",
    "run_mfc",
]

Role = Literal["actor", "critic", "ref", "reward"]
InterfaceType = Literal["generate", "inference", "train", "compute"]
ROLES: tuple[str, ...] = get_args(Role)
INTERFACE_TYPES: tuple[str, ...] = get_args(InterfaceType)

# Keys each step's prompt batch brings from the dataset (the `PromptBatch` itself, its token
# ids and reference answers); everything else is produced by an MFC.
DATASET_KEYS: tuple[str, ...] = ("prompt_batch", "prompt_ids", "answers")

# Implementations of MFC interfaces, looked up by `MFC.interface` (filled by jaxrlhf.system.mfcs).
MFC_INTERFACES: Registry[Any] = Registry("MFC interface")

# How to get each model role built, for the "role with no model" error.
_ENABLE_HINT = {
    "critic": "critic.enabled=true",
    "ref": "ref.enabled=true",
    "reward": "reward_model.enabled=true",
}


class DataflowError(ConfigError):
    """An invalid dataflow graph; the message is one sentence for the user.

    A subclass of ConfigError because graphs come from configs: ``main_guard`` prints it as one
    line.
    """


@dataclass(frozen=True)
class MicroBatchSpec:
    """How an MFC splits its batch: at least ``n_mbs`` micro-batches, each holding at most
    ``max_tokens`` tokens (None: no token budget, e.g. generation batches by server slots)."""

    n_mbs: int = 1
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.n_mbs < 1:
            raise DataflowError(f"MicroBatchSpec.n_mbs must be >= 1, got {self.n_mbs}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DataflowError(
                f"MicroBatchSpec.max_tokens must be >= 1 or None, got {self.max_tokens}"
            )

    def describe(self) -> str:
        """Short text, e.g. ``mb<=4096 tok`` or ``2 mbs, mb<=512 tok``."""
        parts = [f"{self.n_mbs} mbs"] if self.n_mbs > 1 else []
        if self.max_tokens is not None:
            parts.append(f"mb<={self.max_tokens} tok")
        return ", ".join(parts)


@dataclass(frozen=True)
class MFC:
    """One model function call: ``interface.interface_type`` run on the ``role`` model.

    ``role`` is None exactly for ``compute`` MFCs (host or device computations without a
    model, such as rule-based rewards and advantages). ``options`` are small settings shown by
    ``describe`` (estimator name, group size, ...); the interface reads the rest from the config.
    """

    name: str
    role: Role | None
    interface_type: InterfaceType
    interface: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    mb_spec: MicroBatchSpec = field(default_factory=MicroBatchSpec)
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DataflowError(f"an MFC name must be a non-empty string, got {self.name!r}")
        set_ = object.__setattr__  # frozen: normalise the sequences once, here
        set_(self, "inputs", _as_keys(self.inputs, self.name, "inputs"))
        set_(self, "outputs", _as_keys(self.outputs, self.name, "outputs"))
        set_(self, "options", MappingProxyType(dict(self.options)))
        if self.interface_type not in INTERFACE_TYPES:
            raise DataflowError(
                f"MFC {self.name!r} has unknown interface type {self.interface_type!r}; "
                f"expected one of {', '.join(INTERFACE_TYPES)}"
            )
        if self.role is not None and self.role not in ROLES:
            raise DataflowError(
                f"MFC {self.name!r} has unknown model role {self.role!r}; "
                f"expected one of {', '.join(ROLES)}"
            )
        if (self.role is None) != (self.interface_type == "compute"):
            raise DataflowError(
                f"MFC {self.name!r} has interface type {self.interface_type!r} and role "
                f"{self.role!r}, but only 'compute' MFCs run without a model (role None)"
            )
        for key in self.outputs:
            if self.outputs.count(key) > 1:
                raise DataflowError(f"MFC {self.name!r} lists output key {key!r} twice")

    def where(self) -> str:
        """``role/interface_type (interface)``, e.g. ``actor/train (ppo_actor)``."""
        return f"{self.role or '-'}/{self.interface_type} ({self.interface})"

    def settings(self) -> str:
        """Options and micro-batch spec as text, e.g. ``estimator=gae, mb<=4096 tok``."""
        parts = [f"{k}={v}" for k, v in self.options.items()]
        return ", ".join([*parts, self.mb_spec.describe()] if self.mb_spec.describe() else parts)


def _as_keys(keys: Iterable[str] | str, name: str, what: str) -> tuple[str, ...]:
    if isinstance(keys, str):  # ("prompt_ids") is a str, not a tuple: a common slip
        keys = (keys,)
    keys = tuple(keys)
    for key in keys:
        if not isinstance(key, str) or not key:
            raise DataflowError(f"MFC {name!r} has an invalid key {key!r} in its {what}")
    return keys


class DataflowGraph:
    """A validated DAG of MFCs; edges go from the producer of a key to each consumer.

    Construction validates (one-sentence `DataflowError`): unique MFC names, every role backed by
    a model in ``models``, one producer per key (dataset keys included), every input produced,
    no cycles. ``models=None`` means "whatever roles the MFCs use".
    """

    def __init__(
        self,
        mfcs: Sequence[MFC],
        *,
        dataset_keys: Collection[str] = DATASET_KEYS,
        models: Collection[str] | None = None,
        name: str = "custom",
    ) -> None:
        self.name = name
        self.dataset_keys: tuple[str, ...] = tuple(dataset_keys)
        self._mfcs: dict[str, MFC] = {}
        for mfc in mfcs:
            if mfc.name in self._mfcs:
                raise DataflowError(f"MFC name {mfc.name!r} is used twice; names must be unique")
            self._mfcs[mfc.name] = mfc
        used = {m.role for m in mfcs if m.role is not None}
        self.models: tuple[str, ...] = tuple(
            r for r in ROLES if r in (used if models is None else models)
        )
        self._check_roles()
        self._producer = self._find_producers()
        self._check_inputs()
        self._edges = self._find_edges()
        self.order: tuple[str, ...] = self._topological_order()
        self.stages: tuple[tuple[str, ...], ...] = self._stages()

    # ------------------------------------------------------------------ validation

    def _check_roles(self) -> None:
        for mfc in self._mfcs.values():
            if mfc.role is not None and mfc.role not in self.models:
                have = ", ".join(self.models) or "none"
                hint = _ENABLE_HINT.get(mfc.role)
                fix = f"; set {hint} or drop the MFC" if hint else ""
                raise DataflowError(
                    f"MFC {mfc.name!r} runs on the {mfc.role} model, but this config builds no "
                    f"{mfc.role} model (models: {have}){fix}"
                )

    def _find_producers(self) -> dict[str, str | None]:
        """key -> producing MFC name (None: the dataset)."""
        producer: dict[str, str | None] = dict.fromkeys(self.dataset_keys)
        for mfc in self._mfcs.values():
            for key in mfc.outputs:
                if key not in producer:
                    producer[key] = mfc.name
                    continue
                other = producer[key]
                first = "the dataset" if other is None else f"MFC {other!r}"
                raise DataflowError(
                    f"key {key!r} is produced by both {first} and MFC {mfc.name!r}; "
                    "each key must have exactly one producer"
                )
        return producer

    def _check_inputs(self) -> None:
        for mfc in self._mfcs.values():
            for key in mfc.inputs:
                if key not in self._producer:
                    dataset = ", ".join(self.dataset_keys) or "none"
                    raise DataflowError(
                        f"MFC {mfc.name!r} needs key {key!r}, but no MFC produces it and the "
                        f"dataset does not provide it (dataset keys: {dataset})"
                    )

    def _find_edges(self) -> dict[tuple[str, str], tuple[str, ...]]:
        """(producer, consumer) -> the keys passed along that edge, in consumer input order."""
        edges: dict[tuple[str, str], tuple[str, ...]] = {}
        for mfc in self._mfcs.values():
            for key in mfc.inputs:
                src = self._producer[key]
                if src is not None:
                    edges[(src, mfc.name)] = (*edges.get((src, mfc.name), ()), key)
        return edges

    def _topological_order(self) -> tuple[str, ...]:
        """Kahn's algorithm; ties keep the order in which MFCs were given."""
        indeg = dict.fromkeys(self._mfcs, 0)
        for _, dst in self._edges:
            indeg[dst] += 1
        ready = [n for n in self._mfcs if indeg[n] == 0]
        order: list[str] = []
        while ready:
            node = ready.pop(0)
            order.append(node)
            for dst in self.successors(node):
                indeg[dst] -= 1
                if indeg[dst] == 0:
                    ready.append(dst)
            ready.sort(key=list(self._mfcs).index)
        if len(order) < len(self._mfcs):
            raise DataflowError(f"the dataflow graph has a cycle: {self._find_cycle(order)}")
        return tuple(order)

    def _find_cycle(self, done: Sequence[str]) -> str:
        """Text of one cycle among the MFCs Kahn's algorithm could not order."""
        left = [n for n in self._mfcs if n not in done]
        # Every node left has a predecessor that is also left: walk backwards until one repeats.
        path = [left[0]]
        while True:
            prev = next(s for (s, d) in self._edges if d == path[-1] and s in left)
            if prev in path:
                cycle = [*path[path.index(prev) :], prev][::-1]
                break
            path.append(prev)
        hops = [f"{a} -[{', '.join(self._edges[(a, b)])}]-> " for a, b in itertools.pairwise(cycle)]
        return "".join(hops) + cycle[-1]

    def _stages(self) -> tuple[tuple[str, ...], ...]:
        """Longest-path levels: each stage depends only on earlier stages."""
        level: dict[str, int] = {}
        for node in self.order:
            level[node] = 1 + max((level[p] for p in self.predecessors(node)), default=-1)
        n = 1 + max(level.values(), default=-1)
        return tuple(tuple(x for x in self.order if level[x] == i) for i in range(n))

    # ------------------------------------------------------------------ queries

    def __getitem__(self, name: str) -> MFC:
        try:
            return self._mfcs[name]
        except KeyError:
            raise KeyError(f"no MFC named {name!r} (have: {', '.join(self._mfcs)})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._mfcs

    def __iter__(self) -> Iterator[MFC]:
        """MFCs in topological order."""
        return (self._mfcs[n] for n in self.order)

    def __len__(self) -> int:
        return len(self._mfcs)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._mfcs)

    @property
    def edges(self) -> dict[tuple[str, str], tuple[str, ...]]:
        """``(producer, consumer) -> keys``, a copy."""
        return dict(self._edges)

    def producer(self, key: str) -> str | None:
        """The MFC that produces ``key`` (None: the dataset)."""
        if key not in self._producer:
            raise KeyError(f"no MFC produces key {key!r} and the dataset does not provide it")
        return self._producer[key]

    def consumers(self, key: str) -> tuple[str, ...]:
        """MFCs that read ``key``, in topological order."""
        return tuple(n for n in self.order if key in self._mfcs[n].inputs)

    def predecessors(self, name: str) -> tuple[str, ...]:
        return tuple(s for (s, d) in self._edges if d == name)

    def successors(self, name: str) -> tuple[str, ...]:
        return tuple(d for (s, d) in self._edges if s == name)

    def resolve_interfaces(self, registry: Registry[Any] = MFC_INTERFACES) -> dict[str, Any]:
        """MFC name -> its registered interface implementation (RegistryError if missing)."""
        return {n: registry.get(self._mfcs[n].interface) for n in self.order}

    def describe(self) -> str:
        """Human-readable graph: header, MFCs by stage with their keys, then the edges."""
        lines = [
            f"dataflow graph: {self.name}",
            f"models: {', '.join(self.models) or 'none'}",
            f"dataset keys: {', '.join(self.dataset_keys) or 'none'}",
        ]
        w_name = max((len(n) for n in self._mfcs), default=0)
        w_where = max((len(m.where()) for m in self._mfcs.values()), default=0)
        for i, stage in enumerate(self.stages, 1):
            lines.append(f"stage {i}: {', '.join(stage)}")
            for name in stage:
                mfc = self._mfcs[name]
                lines.append(
                    f"  {name:<{w_name}}  {mfc.where():<{w_where}}  {mfc.settings()}".rstrip()
                )
                lines.append(f"      in : {', '.join(mfc.inputs) or '-'}")
                lines.append(f"      out: {', '.join(mfc.outputs) or '-'}")
        lines.append("edges:")
        rank = {n: i for i, n in enumerate(self.order)}
        for (src, dst), keys in sorted(
            self._edges.items(), key=lambda e: (rank[e[0][0]], rank[e[0][1]])
        ):
            lines.append(f"  {src} -> {dst} [{', '.join(keys)}]")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"DataflowGraph({self.name!r}, order={list(self.order)})"


# ---------------------------------------------------------------------------- running a graph


class MFCInputs(Mapping[str, Any]):
    """The step's data as one MFC sees it: its declared inputs, read-only.

    Reading a key the MFC does not declare is a `DataflowError` naming it (``in`` answers False
    for such a key, so optional inputs are tested with ``in``); every read is recorded in
    ``read``, which tests compare with the declaration.
    """

    def __init__(self, mfc: MFC, data: Mapping[str, Any]) -> None:
        self._mfc, self._data = mfc, data
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        if key not in self._mfc.inputs:
            raise DataflowError(
                f"MFC {self._mfc.name!r} read key {key!r}, which it does not declare as an "
                f"input (inputs: {', '.join(self._mfc.inputs) or 'none'})"
            )
        self.read.add(key)
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._mfc.inputs and key in self._data

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._mfc.inputs if k in self._data)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def run_mfc(mfc: MFC, impl: Any, ctx: Any, data: Mapping[str, Any]) -> tuple[dict, set[str]]:
    """Call ``impl.<interface_type>(ctx, mfc, inputs)``; returns its outputs (exactly the
    declared ones, else a `DataflowError` naming the key) and the keys it read."""
    inputs = MFCInputs(mfc, data)
    outputs = getattr(impl, mfc.interface_type)(ctx, mfc, inputs)
    extra = [k for k in outputs if k not in mfc.outputs]
    if extra:
        raise DataflowError(
            f"MFC {mfc.name!r} wrote key {extra[0]!r}, which it does not declare as an output "
            f"(outputs: {', '.join(mfc.outputs) or 'none'})"
        )
    missing = [k for k in mfc.outputs if k not in outputs]
    if missing:
        raise DataflowError(f"MFC {mfc.name!r} did not produce its declared output {missing[0]!r}")
    return dict(outputs), inputs.read


def run_graph(
    graph: DataflowGraph,
    impls: Mapping[str, Any],
    ctx: Any,
    data: dict[str, Any],
    *,
    timer: Any = None,
    on_output: Any = None,
) -> dict[str, Any]:
    """Run every MFC of ``graph`` in topological order over ``data`` (the dataset keys), adding
    each MFC's outputs; ``timer(name)`` (a context manager) times each call, ``on_output(name,
    outputs, read)`` sees each result (e.g. to wait for device work or record reads)."""
    missing = [k for k in graph.dataset_keys if k not in data]
    if missing:
        raise DataflowError(f"the step's data lacks dataset key {missing[0]!r}")
    for name in graph.order:
        mfc = graph[name]
        with timer(name) if timer is not None else contextlib.nullcontext():
            outputs, read = run_mfc(mfc, impls[name], ctx, data)
            if on_output is not None:
                on_output(name, outputs, read)
        data.update(outputs)
    return data


# ---------------------------------------------------------------------------- from the config


def algorithm_label(cfg: Config) -> str:
    """E.g. ``PPO + ref, sync`` or ``GRPO + reward model, async, decoupled loss``."""
    a = cfg.algorithm
    est = ADVANTAGE_ESTIMATORS.info(a.advantage_estimator)
    parts = [est.get("label", a.advantage_estimator)]
    parts += ["critic"] if cfg.use_critic and not est.get("needs_values") else []
    parts += ["ref"] if cfg.use_ref else []
    parts += ["reward model"] if cfg.reward_model.enabled else []
    label = " + ".join(parts) + f", {cfg.experiment.mode}"
    return label + (", decoupled loss" if a.decoupled_loss else "")


def build_graph(cfg: Config) -> DataflowGraph:
    """The validated MFC graph of one RL step for ``cfg`` (see the module docstring)."""
    a, g = cfg.algorithm, cfg.generation
    critic, ref, rm = cfg.use_critic, cfg.use_ref, cfg.reward_model.enabled
    is_async = cfg.experiment.mode == "async"
    # Async "fused": π_prox is stop_gradient(π_θ) inside the single update, no separate pass.
    prox = is_async and a.decoupled_loss and cfg.async_ppo.proximal == "recompute"
    seq = ("input_ids", "response_mask")

    def model_call(name: str, role: Role, interface: str, out: str, tokens: int) -> MFC:
        # a forward over whole sequences: prompt positions are computed too (and ignored)
        return MFC(
            name, role, "inference", interface, ("input_ids",), (out,),
            MicroBatchSpec(max_tokens=tokens),
        )  # fmt: skip

    gen_options: dict[str, Any] = {"n_samples": g.n_samples, "max_new_tokens": g.max_new_tokens}
    if is_async:
        gen_options |= {"source": "async server", "eta": cfg.experiment.max_head_offpolicyness}
    mfcs = [
        MFC(
            "actor_gen",
            "actor",
            "generate",
            "ppo_actor",
            # sync: this step's prompt batch; async: finished groups from the generation server
            inputs=() if is_async else ("prompt_batch",),
            outputs=("trajectories", *seq, "behav_logprobs", "versions", "truncated"),
            options=gen_options,
        ),
        MFC(
            "rew_inf",
            None,
            "compute",
            "rule_reward",
            inputs=("trajectories",),  # decoded responses, prompts and answers
            outputs=("scores",),
            options={"fn": cfg.reward.fn or "task verifier"},
        ),
    ]
    if rm:
        tokens = cfg.reward_model.max_tokens_per_mb
        mfcs.append(model_call("rm_inf", "reward", "reward_model", "rm_scores", tokens))
    if ref:
        mfcs.append(
            model_call("ref_inf", "ref", "ppo_actor", "ref_logprobs", cfg.ref.max_tokens_per_mb)
        )
    if critic:
        tokens = cfg.critic.max_tokens_per_mb
        mfcs.append(model_call("critic_inf", "critic", "ppo_critic", "values", tokens))
    if prox:
        tokens = cfg.actor.max_tokens_per_mb
        mfcs.append(model_call("actor_inf", "actor", "ppo_actor", "prox_logprobs", tokens))

    kl_penalty = ref and a.kl_in_reward and a.kl_coef > 0
    adv_in = ["response_mask", "scores"]
    adv_in += ["rm_scores"] if rm else []  # summed with the rule-based scores
    est = ADVANTAGE_ESTIMATORS.info(a.advantage_estimator)
    adv_in += ["values"] if est.get("needs_values") else []
    # Truncated responses bootstrap from the critic's value at the cut (GAE), or end there.
    bootstrap = effective_truncation(a.truncation, a.advantage_estimator) == "bootstrap"
    adv_in += ["truncated"] if bootstrap else []
    adv_in += ["ref_logprobs", "prox_logprobs" if prox else "behav_logprobs"] if kl_penalty else []
    adv_options: dict[str, Any] = {"estimator": a.advantage_estimator}
    if est.get("group"):
        adv_options["group_size"] = g.n_samples
    if bootstrap:
        adv_options["truncation"] = "bootstrap"
    if a.overlong_buffer_len is not None:
        adv_options["overlong_buffer_len"] = a.overlong_buffer_len
    if rm:
        adv_options["rewards"] = "scores + rm_scores"
    mfcs.append(
        MFC(
            "advantages",
            None,
            "compute",
            "advantages",
            inputs=tuple(adv_in),
            outputs=("advantages", "returns") if critic else ("advantages",),
            options=adv_options,
        )
    )

    train_options = {"ppo_epochs": a.ppo_epochs, "n_minibatches": a.n_minibatches}
    train_in = [*seq, "behav_logprobs", "advantages"]
    train_in += ["ref_logprobs"] if ref else []  # the KL loss term, or only its metric
    train_in += ["prox_logprobs"] if prox else []
    mfcs.append(
        MFC(
            "actor_train",
            "actor",
            "train",
            "ppo_actor",
            inputs=tuple(train_in),
            outputs=(),
            mb_spec=MicroBatchSpec(max_tokens=cfg.actor.max_tokens_per_mb),
            options={"policy_loss": a.policy_loss, **train_options},
        )
    )
    if critic:
        mfcs.append(
            MFC(
                "critic_train",
                "critic",
                "train",
                "ppo_critic",
                # old values only for the clipped value loss
                inputs=(*seq, *(("values",) if a.value_eps_clip is not None else ()), "returns"),
                outputs=(),
                mb_spec=MicroBatchSpec(max_tokens=cfg.critic.max_tokens_per_mb),
                options=train_options,
            )
        )

    built = (critic, ref, rm)
    models = ["actor"] + [r for on, r in zip(built, ("critic", "ref", "reward"), strict=True) if on]
    # Async: the generation server reads the prompts itself; the step's data starts empty.
    keys = () if is_async else DATASET_KEYS
    return DataflowGraph(mfcs, dataset_keys=keys, models=models, name=algorithm_label(cfg))
