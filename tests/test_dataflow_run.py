"""The dataflow graph is enforced at run time: an MFC reads only the keys it declares, writes
exactly its declared outputs, and in real runs reads every key it declares."""

import jax.numpy as jnp
import numpy as np
import pytest
from toy import toy_config

from jaxrlhf.dfg import MFC, DataflowError, DataflowGraph, run_graph, run_mfc
from jaxrlhf.system.coordinator import PPOCoordinator

TINY = [
    "data.batch_size=2", "data.eval_size=4", "generation.n_samples=2",
    "generation.max_new_tokens=4", "experiment.total_steps=1", "sft_warmup.steps=0",
]  # fmt: skip


class Impl:
    """A compute MFC whose behaviour each test sets."""

    def __init__(self, fn):
        self.compute = fn


def _mfc(inputs, outputs, name="m"):
    return MFC(name, None, "compute", "x", inputs, outputs)


def test_reading_an_undeclared_key_names_it():
    mfc = _mfc(("a",), ("b",))
    impl = Impl(lambda ctx, m, data: {"b": data["a"] + data["secret"]})
    with pytest.raises(DataflowError) as e:
        run_mfc(mfc, impl, None, {"a": 1, "secret": 2})
    assert str(e.value) == (
        "MFC 'm' read key 'secret', which it does not declare as an input (inputs: a)"
    )


def test_undeclared_keys_are_absent_and_the_view_is_read_only():
    mfc = _mfc(("a", "maybe"), ("b",))
    seen = {}

    def fn(ctx, m, data):
        seen.update(contains_secret="secret" in data, contains_maybe="maybe" in data,
                    keys=sorted(data))  # fmt: skip
        with pytest.raises(TypeError):
            data["b"] = 1  # outputs are returned, never written into the step's data
        return {"b": 0}

    outputs, read = run_mfc(mfc, Impl(fn), None, {"a": 1, "secret": 2})
    assert seen == {"contains_secret": False, "contains_maybe": False, "keys": ["a"]}
    assert outputs == {"b": 0} and read == set()


def test_writing_an_undeclared_or_missing_output_names_it():
    mfc = _mfc(("a",), ("b",))
    with pytest.raises(DataflowError, match="wrote key 'c', which it does not declare"):
        run_mfc(mfc, Impl(lambda ctx, m, d: {"b": 0, "c": 1}), None, {"a": 1})
    with pytest.raises(DataflowError, match="did not produce its declared output 'b'"):
        run_mfc(mfc, Impl(lambda ctx, m, d: {}), None, {"a": 1})


def test_run_graph_passes_outputs_along_in_order():
    graph = DataflowGraph(
        [_mfc(("y",), ("z",), "second"), _mfc(("x",), ("y",), "first")], dataset_keys=("x",)
    )
    impls = {
        "first": Impl(lambda ctx, m, d: {"y": d["x"] * 2}),
        "second": Impl(lambda ctx, m, d: {"z": d["y"] + 1}),
    }
    calls = []
    data = run_graph(graph, impls, None, {"x": 3}, on_output=lambda n, o, r: calls.append((n, r)))
    assert data == {"x": 3, "y": 6, "z": 7}
    assert calls == [("first", {"x"}), ("second", {"y"})]
    with pytest.raises(DataflowError, match="lacks dataset key 'x'"):
        run_graph(graph, impls, None, {})


@pytest.mark.parametrize(
    "variant",
    [
        # PPO with a critic, a reference in the reward and in the loss metric, 2 epochs
        ["algorithm.advantage_estimator=gae", "critic.enabled=true", "algorithm.kl_coef=0.05",
         "algorithm.kl_in_reward=true", "algorithm.ppo_epochs=2"],
        # GRPO with a KL loss and the overlong penalty
        ["algorithm.advantage_estimator=grpo", "algorithm.kl_coef=0.05",
         "algorithm.overlong_buffer_len=2"],
        # a reference only for the KL metric
        ["algorithm.advantage_estimator=grpo", "ref.enabled=true"],
    ],
    ids=["ppo_kl_in_reward", "grpo_kl_loss", "grpo_ref_metric"],
)  # fmt: skip
def test_every_mfc_reads_exactly_its_declared_inputs(tmp_path, variant):
    cfg = toy_config(tmp_path, *TINY, *variant)
    coord = PPOCoordinator(cfg)
    with coord.logger:
        coord.train_step()
    assert set(coord.last_reads) == set(coord.graph.names)
    for name in coord.graph.order:
        assert coord.last_reads[name] == set(coord.graph[name].inputs), name


def test_reference_uses_its_own_dtypes(tmp_path):
    """ref.param_dtype / compute_dtype hold when the reference starts from the actor's weights."""
    cfg = toy_config(
        tmp_path, *TINY, "algorithm.advantage_estimator=grpo", "algorithm.kl_coef=0.1",
        "ref.param_dtype=bfloat16", "ref.compute_dtype=bfloat16",
    )  # fmt: skip
    coord = PPOCoordinator(cfg)
    m = coord.models
    assert m.ref_cfg.param_dtype == "bfloat16" and m.ref_cfg.compute_dtype == "bfloat16"
    assert {str(x.dtype) for x in _leaves(m.ref_params)} == {"bfloat16"}
    assert {str(x.dtype) for x in _leaves(m.actor.params)} == {"float32"}
    # the same weights, rounded to bfloat16
    np.testing.assert_array_equal(
        np.asarray(m.ref_params["embed"], np.float32),
        np.asarray(jnp.asarray(m.actor.params["embed"]).astype(jnp.bfloat16), np.float32),
    )
    with coord.logger:
        metrics = coord.train_step()
    assert np.isfinite(metrics["actor/kl"])


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_reference_dtypes_default_to_the_actors(tmp_path):
    """Unset ref dtypes follow the actor (a bfloat16 actor gets a bfloat16 reference, not a
    float32 copy twice its size)."""
    cfg = toy_config(
        tmp_path, *TINY, "algorithm.advantage_estimator=grpo", "algorithm.kl_coef=0.1",
        "actor.param_dtype=bfloat16", "actor.compute_dtype=bfloat16",
    )  # fmt: skip
    m = PPOCoordinator(cfg).models
    assert m.ref_cfg.param_dtype == "bfloat16" and m.ref_cfg.compute_dtype == "bfloat16"
    assert {str(x.dtype) for x in _leaves(m.ref_params)} == {"bfloat16"}
