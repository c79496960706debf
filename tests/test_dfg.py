"""The dataflow graph: shapes per algorithm, topological order, validation messages, describe."""

from __future__ import annotations

import pytest

from jaxrlhf.config import ConfigError, load_config
from jaxrlhf.dfg import MFC, DataflowError, DataflowGraph, MicroBatchSpec, build_graph
from jaxrlhf.registry import Registry, RegistryError

SEQ = ("input_ids", "response_mask")


def graph_for(*overrides: str) -> DataflowGraph:
    return build_graph(load_config(None, list(overrides)))


def edge_set(graph: DataflowGraph) -> set[tuple[str, str]]:
    return set(graph.edges)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataflowError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def assert_topological(graph: DataflowGraph) -> None:
    rank = {name: i for i, name in enumerate(graph.order)}
    assert set(rank) == graph.names
    stage_of = {n: i for i, stage in enumerate(graph.stages) for n in stage}
    for src, dst in graph.edges:
        assert rank[src] < rank[dst], (src, dst)
        assert stage_of[src] < stage_of[dst], (src, dst)


# ----------------------------------------------------------------------------- graph shapes

PPO_EDGES = {
    ("actor_gen", "rew_inf"),
    ("actor_gen", "critic_inf"),
    ("actor_gen", "advantages"),
    ("actor_gen", "actor_train"),
    ("actor_gen", "critic_train"),
    ("rew_inf", "advantages"),
    ("critic_inf", "advantages"),
    ("critic_inf", "critic_train"),
    ("advantages", "actor_train"),
    ("advantages", "critic_train"),
}
GRPO_EDGES = {
    ("actor_gen", "rew_inf"),
    ("actor_gen", "advantages"),
    ("actor_gen", "actor_train"),
    ("rew_inf", "advantages"),
    ("advantages", "actor_train"),
}
REF_EDGES = {("actor_gen", "ref_inf"), ("ref_inf", "actor_train")}


def test_ppo_with_critic_graph() -> None:
    g = graph_for()  # defaults: gae, so a critic; kl_coef 0, so no reference model
    assert g.names == {
        "actor_gen",
        "rew_inf",
        "critic_inf",
        "advantages",
        "actor_train",
        "critic_train",
    }
    assert edge_set(g) == PPO_EDGES
    assert g.models == ("actor", "critic")
    assert g.order == (
        "actor_gen",
        "rew_inf",
        "critic_inf",
        "advantages",
        "actor_train",
        "critic_train",
    )
    assert g.stages == (
        ("actor_gen",),
        ("rew_inf", "critic_inf"),
        ("advantages",),
        ("actor_train", "critic_train"),
    )
    assert g.edges[("critic_inf", "advantages")] == ("values",)
    assert g.edges[("advantages", "critic_train")] == ("returns",)
    assert g.edges[("actor_gen", "actor_train")] == (*SEQ, "behav_logprobs")
    assert g["advantages"].options["estimator"] == "gae"
    assert g["advantages"].outputs == ("advantages", "returns")
    assert g["actor_gen"].role == "actor" and g["actor_gen"].interface_type == "generate"
    assert g["rew_inf"].role is None and g["rew_inf"].interface_type == "compute"
    assert g["critic_train"].interface_type == "train"
    assert g["critic_inf"].mb_spec == MicroBatchSpec(max_tokens=4096)
    assert g.producer("prompt_ids") is None and g.producer("values") == "critic_inf"
    assert g.consumers("values") == ("advantages", "critic_train")


def test_ppo_with_critic_and_ref_is_the_issue_chain() -> None:
    g = graph_for("algorithm.kl_coef=0.05", "actor.max_tokens_per_mb=512")
    assert edge_set(g) == PPO_EDGES | REF_EDGES
    assert g.stages == (
        ("actor_gen",),
        ("rew_inf", "ref_inf", "critic_inf"),
        ("advantages",),
        ("actor_train", "critic_train"),
    )
    assert g.models == ("actor", "critic", "ref")
    assert g["actor_train"].mb_spec.max_tokens == 512
    assert g.name == "PPO + ref, sync"


def test_grpo_has_no_critic() -> None:
    g = graph_for("algorithm.advantage_estimator=grpo")
    assert g.names == {"actor_gen", "rew_inf", "advantages", "actor_train"}
    assert edge_set(g) == GRPO_EDGES
    assert g.models == ("actor",)
    assert g["advantages"].outputs == ("advantages",)
    assert dict(g["advantages"].options) == {"estimator": "grpo", "group_size": 4}


@pytest.mark.parametrize("estimator", ["dr_grpo", "rloo", "reinforce_pp"])
def test_estimator_swap_changes_only_the_advantage_option(estimator: str) -> None:
    grpo = graph_for("algorithm.advantage_estimator=grpo")
    g = graph_for(f"algorithm.advantage_estimator={estimator}")
    assert g.names == grpo.names and g.edges == grpo.edges
    assert g["advantages"].options["estimator"] == estimator
    assert [g[n] for n in g.order if n != "advantages"] == [
        grpo[n] for n in grpo.order if n != "advantages"
    ]


def test_grpo_with_reference_model() -> None:
    g = graph_for("algorithm.advantage_estimator=grpo", "algorithm.kl_coef=0.1")
    assert edge_set(g) == GRPO_EDGES | REF_EDGES
    assert g.edges[("ref_inf", "actor_train")] == ("ref_logprobs",)
    # ref forced on with kl_coef 0: logprobs still flow to the actor (the KL metric)
    g = graph_for("algorithm.advantage_estimator=grpo", "ref.enabled=true")
    assert edge_set(g) == GRPO_EDGES | REF_EDGES


def test_kl_in_reward_feeds_ref_logprobs_to_advantages() -> None:
    g = graph_for("algorithm.kl_coef=0.1", "algorithm.kl_in_reward=true")
    assert edge_set(g) == PPO_EDGES | REF_EDGES | {("ref_inf", "advantages")}
    assert g["advantages"].inputs == (
        "response_mask",
        "scores",
        "values",
        "truncated",  # PPO with a critic bootstraps truncated responses by default
        "ref_logprobs",
        "behav_logprobs",
    )


def test_reward_model_scores_are_summed_in_advantages() -> None:
    g = graph_for(
        "algorithm.advantage_estimator=grpo", "reward_model.enabled=true", "reward_model.path=rm"
    )
    assert edge_set(g) == GRPO_EDGES | {("actor_gen", "rm_inf"), ("rm_inf", "advantages")}
    assert g["rm_inf"].role == "reward" and g["rm_inf"].outputs == ("rm_scores",)
    assert {"scores", "rm_scores"} <= set(g["advantages"].inputs)
    assert g.models == ("actor", "reward")
    assert g.stages[1] == ("rew_inf", "rm_inf")


def test_async_decoupled_loss_adds_proximal_logprobs() -> None:
    base = ["algorithm.advantage_estimator=grpo", "experiment.mode=async"]
    g = graph_for(*base, "algorithm.decoupled_loss=true")
    prox_edges = {("actor_gen", "actor_inf"), ("actor_inf", "actor_train")}
    assert edge_set(g) == GRPO_EDGES | prox_edges
    assert g["actor_inf"].role == "actor" and g["actor_inf"].interface_type == "inference"
    assert g.edges[("actor_inf", "actor_train")] == ("prox_logprobs",)
    with pytest.raises(ConfigError, match="decoupled_loss must be true"):
        graph_for(*base)  # async without the decoupled loss: stale batches would train on-policy
    assert "actor_inf" not in graph_for(base[0], "algorithm.decoupled_loss=true")  # sync
    g = graph_for(
        *base,
        "algorithm.decoupled_loss=true",
        "algorithm.kl_coef=0.1",
        "algorithm.kl_in_reward=true",
    )
    assert g.edges[("actor_inf", "advantages")] == ("prox_logprobs",)


def test_critic_with_a_group_estimator_trains_on_returns() -> None:
    g = graph_for("algorithm.advantage_estimator=rloo", "critic.enabled=true")
    assert {"critic_inf", "critic_train"} <= g.names
    assert "values" not in g["advantages"].inputs
    assert g.edges[("advantages", "critic_train")] == ("returns",)
    assert g.name == "RLOO + critic, sync"


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["algorithm.kl_coef=0.1", "algorithm.kl_in_reward=true"],
        ["algorithm.advantage_estimator=rloo", "reward_model.enabled=true", "reward_model.path=x"],
        [
            "experiment.mode=async",
            "algorithm.decoupled_loss=true",
            "algorithm.kl_coef=0.1",
            "reward_model.enabled=true",
            "reward_model.path=x",
        ],
    ],
)
def test_topological_order_respects_every_edge(overrides: list[str]) -> None:
    g = graph_for(*overrides)
    assert_topological(g)
    assert [m.name for m in g] == list(g.order)
    assert g.order[0] == "actor_gen" and g.order[-1].endswith("_train")


# ----------------------------------------------------------------------------- validation


def mfc(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], role="actor") -> MFC:
    kind = "compute" if role is None else "inference"
    return MFC(name, role, kind, "x", inputs, outputs)


def test_cycle_is_named() -> None:
    mfcs = [
        mfc("gen", ("prompt_ids",), ("seq",)),
        mfc("a", ("seq", "x"), ("y",)),
        mfc("b", ("y",), ("x",)),
    ]
    message = error_of(DataflowGraph, mfcs)
    assert message == "the dataflow graph has a cycle: a -[y]-> b -[x]-> a"


def test_self_cycle_is_named() -> None:
    message = error_of(DataflowGraph, [mfc("loop", ("prompt_ids", "z"), ("z",))])
    assert message == "the dataflow graph has a cycle: loop -[z]-> loop"


def test_missing_key_names_key_and_consumer() -> None:
    mfcs = [m for m in graph_for() if m.name != "advantages"]
    message = error_of(DataflowGraph, mfcs)
    assert message == (
        "MFC 'actor_train' needs key 'advantages', but no MFC produces it and the dataset "
        "does not provide it (dataset keys: prompt_batch, prompt_ids, answers)"
    )


def test_role_without_a_model() -> None:
    mfcs = list(graph_for())
    message = error_of(DataflowGraph, mfcs, models=["actor"])
    assert message == (
        "MFC 'critic_inf' runs on the critic model, but this config builds no critic model "
        "(models: actor); set critic.enabled=true or drop the MFC"
    )


def test_duplicate_names_and_producers() -> None:
    gen = mfc("gen", ("prompt_ids",), ("seq",))
    assert error_of(DataflowGraph, [gen, gen]) == (
        "MFC name 'gen' is used twice; names must be unique"
    )
    other = mfc("gen2", ("prompt_ids",), ("seq",))
    assert error_of(DataflowGraph, [gen, other]) == (
        "key 'seq' is produced by both MFC 'gen' and MFC 'gen2'; "
        "each key must have exactly one producer"
    )
    assert error_of(DataflowGraph, [mfc("p", (), ("answers",))]) == (
        "key 'answers' is produced by both the dataset and MFC 'p'; "
        "each key must have exactly one producer"
    )


def test_mfc_definition_errors() -> None:
    assert error_of(MFC, "adv", "actor", "compute", "advantages", (), ()) == (
        "MFC 'adv' has interface type 'compute' and role 'actor', but only 'compute' MFCs run "
        "without a model (role None)"
    )
    assert "unknown interface type 'train_step'" in error_of(
        MFC, "t", "actor", "train_step", "x", (), ()
    )
    assert "unknown model role 'policy'" in error_of(MFC, "t", "policy", "train", "x", (), ())
    assert error_of(MicroBatchSpec, n_mbs=0) == "MicroBatchSpec.n_mbs must be >= 1, got 0"
    assert MFC("g", "actor", "generate", "x", "prompt_ids", ["seq"]).inputs == ("prompt_ids",)


def test_graph_errors_are_config_errors() -> None:
    assert issubclass(DataflowError, ConfigError)  # main_guard prints them as one line


def test_resolve_interfaces() -> None:
    g = graph_for("algorithm.advantage_estimator=grpo")
    registry: Registry[str] = Registry("MFC interface")
    for name in ("ppo_actor", "rule_reward"):
        registry.register(name, f"impl:{name}")
    with pytest.raises(RegistryError, match="unknown MFC interface 'advantages'"):
        g.resolve_interfaces(registry)
    registry.register("advantages", "impl:advantages")
    impls = g.resolve_interfaces(registry)
    assert impls == {
        "actor_gen": "impl:ppo_actor",
        "rew_inf": "impl:rule_reward",
        "advantages": "impl:advantages",
        "actor_train": "impl:ppo_actor",
    }


# ----------------------------------------------------------------------------- describe


def test_describe_lists_stages_mfcs_keys_and_edges() -> None:
    text = graph_for("algorithm.kl_coef=0.1").describe()
    lines = text.splitlines()
    assert lines[:3] == [
        "dataflow graph: PPO + ref, sync",
        "models: actor, critic, ref",
        "dataset keys: prompt_batch, prompt_ids, answers",
    ]
    assert "stage 2: rew_inf, ref_inf, critic_inf" in lines
    assert "stage 4: actor_train, critic_train" in lines
    gen = next(line for line in lines if line.strip().startswith("actor_gen "))
    assert "actor/generate (ppo_actor)" in gen and "n_samples=4" in gen
    adv = lines.index(next(line for line in lines if line.strip().startswith("advantages ")))
    assert "estimator=gae" in lines[adv]
    want_in = ["in", ":", "response_mask,", "scores,", "values,", "truncated"]
    assert lines[adv + 1].split() == want_in
    assert lines[adv + 2].split() == ["out:", "advantages,", "returns"]
    assert "  actor_gen -> rew_inf [trajectories]" in lines  # decoded texts and answers
    assert "  advantages -> critic_train [returns]" in lines
    edges = lines[lines.index("edges:") + 1 :]
    assert len(edges) == len(graph_for("algorithm.kl_coef=0.1").edges)


# --- the graph asks the registry ------------------------------------------------------------


def test_values_and_truncation_follow_the_estimator_metadata() -> None:
    gae = graph_for()
    assert {"values", "truncated"} <= set(gae["advantages"].inputs)
    assert gae["advantages"].options["truncation"] == "bootstrap"
    assert gae.edges[("actor_gen", "advantages")][-1] == "truncated"
    terminal = graph_for("algorithm.truncation=terminal")
    assert "truncated" not in terminal["advantages"].inputs
    assert "values" in terminal["advantages"].inputs
    for est in ("grpo", "dr_grpo", "rloo", "reinforce_pp"):
        g = graph_for(f"algorithm.advantage_estimator={est}", "critic.enabled=true")
        assert not {"values", "truncated"} & set(g["advantages"].inputs), est
    with pytest.raises(ConfigError, match="truncation 'bootstrap' needs a critic's values"):
        graph_for("algorithm.advantage_estimator=grpo", "algorithm.truncation=bootstrap")


def test_overlong_option_and_its_bound() -> None:
    g = graph_for("algorithm.overlong_buffer_len=64", "generation.max_new_tokens=256")
    assert g["advantages"].options["overlong_buffer_len"] == 64
    assert "overlong_buffer_len" not in graph_for()["advantages"].options
    with pytest.raises(ConfigError, match=r"overlong_buffer_len \(300\) must be <= "):
        graph_for("algorithm.overlong_buffer_len=300", "generation.max_new_tokens=256")


def test_a_registered_estimator_gets_its_label_and_inputs() -> None:
    from jaxrlhf.algorithms import ADVANTAGE_ESTIMATORS, register_advantage_estimator

    register_advantage_estimator(
        "test_critic_baseline", lambda *a, **k: None, label="A2C", needs_values=True, group=False
    )
    try:
        g = graph_for("algorithm.advantage_estimator=test_critic_baseline")
        assert g.name == "A2C, sync" and g.models == ("actor", "critic")
        assert {"values", "truncated"} <= set(g["advantages"].inputs)
    finally:
        ADVANTAGE_ESTIMATORS.unregister("test_critic_baseline")
