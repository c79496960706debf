"""Supervised fine-tuning: the response-only NLL against a padded whole-batch reference (packed
and padded layouts, many micro-batches), prompt tokens that contribute nothing, evaluation,
the toy datasets and chat masks, bad input, exact resume, and SFT export -> PPO start."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from interfaces_reference import TINY, assert_tree_close, padded_batch, random_sequences
from interfaces_reference import ref_logp_entropy as ref_logp

from jaxrlhf.algorithms import masked_nll
from jaxrlhf.config import load_config
from jaxrlhf.data.pipeline import load_tokenizer
from jaxrlhf.data.readers import DataError
from jaxrlhf.data.sft import TOY_TASK, index_batch, load_sft_table
from jaxrlhf.interfaces import batch_gradients, pack_sequences, put_batch
from jaxrlhf.interfaces.sft import SFTLossSpec, sft_eval, sft_microbatch_loss
from jaxrlhf.models import init_model

ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = [
    "actor.hidden_size=32", "actor.intermediate_size=64", "actor.num_layers=1",
    "actor.num_heads=2", "actor.num_kv_heads=1", "logging.progress=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return init_model(TINY, seed=3)


@pytest.fixture(scope="module")
def seqs():
    ids, fields = random_sequences(7, n=6, lo=5, hi=20)
    return ids, fields["loss_mask"]


@pytest.fixture(scope="module")
def grad_fn():
    def fn(params, batch):
        spec = SFTLossSpec()
        grads, metrics = batch_gradients(sft_microbatch_loss, params, batch, cfg=TINY, spec=spec)
        return grads, metrics["loss"]

    return jax.jit(fn)


def _reference(params, ids, masks):
    """Mean NLL over response tokens of a right-padded batch (one forward, no packing)."""
    ids_bt, attn_bt, f = padded_batch(ids, {"loss_mask": masks}, 24)
    mask = jnp.asarray(f["loss_mask"])
    return lambda p: -jnp.sum(ref_logp(p, TINY, ids_bt, attn_bt)[0] * mask) / jnp.sum(mask)


@pytest.mark.parametrize("pack", [True, False])
def test_loss_and_gradient_match_padded_reference(model, seqs, grad_fn, pack):
    """Packed rows (segment ids) and padded rows (one sequence each), over several micro-batches,
    give the whole-batch response-only NLL and its gradient."""
    ids, masks = seqs
    packed = pack_sequences(ids, {"loss_mask": masks}, max_tokens_per_mb=24, row_len=24, pack=pack)
    assert packed.num_microbatches > 1
    grads, loss = grad_fn(model.params, put_batch(packed, None))
    ref_loss, ref_grads = jax.value_and_grad(_reference(model.params, ids, masks))(model.params)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert_tree_close(grads, ref_grads, atol=2e-6, rtol=1e-4)


def test_prompt_tokens_contribute_nothing(model, seqs):
    """Perturbing the log-probs of prompt targets leaves the loss and gradient unchanged (the
    gradient there is exactly 0); the loss is the response-only NLL, not the all-token one."""
    ids, masks = seqs
    ids_bt, attn_bt, f = padded_batch(ids, {"loss_mask": masks}, 24)
    logp = ref_logp(model.params, TINY, ids_bt, attn_bt)[0]
    mask = jnp.asarray(f["loss_mask"])
    n = jnp.sum(mask)
    noise = jax.random.normal(jax.random.key(0), logp.shape) * (1.0 - mask) * 5.0
    assert float(jnp.abs(noise).sum()) > 0
    loss, grad = jax.value_and_grad(masked_nll)(logp, mask, n)
    loss_p, grad_p = jax.value_and_grad(masked_nll)(logp + noise, mask, n)
    assert float(loss) == float(loss_p)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad_p))
    prompt = (np.asarray(mask) == 0) & (np.asarray(attn_bt) > 0)
    assert prompt.sum() > 10 and np.all(np.asarray(grad)[prompt] == 0.0)
    np.testing.assert_allclose(np.asarray(grad)[np.asarray(mask) > 0], -1.0 / float(n))
    # The packed step computes exactly this masked loss, not the all-token NLL.
    packed = pack_sequences(ids, {"loss_mask": masks}, max_tokens_per_mb=96, row_len=24)
    nll, tokens = sft_eval(model.params, TINY, packed)
    assert tokens == float(n)
    np.testing.assert_allclose(nll / tokens, float(loss), rtol=1e-5)
    scored = jnp.asarray(attn_bt * np.roll(attn_bt, 1, axis=1), jnp.float32).at[:, 0].set(0.0)
    all_tokens = float(-jnp.sum(logp * scored) / jnp.sum(scored))
    assert abs(all_tokens - nll / tokens) > 1e-3


def test_index_batches_are_epochs_of_permutations():
    seen = np.concatenate([index_batch(10, 5, k, seed=1, shuffle=True) for k in range(4)])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # reshuffled per epoch
    np.testing.assert_array_equal(index_batch(10, 5, 3, seed=1, shuffle=True), seen[15:])
    np.testing.assert_array_equal(index_batch(10, 4, 1, seed=1, shuffle=False), [4, 5, 6, 7])


# --------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _cfg(tmp_path, *extra):
    return load_config(ROOT / "configs" / "sft_toy.yaml",
                       [*TINY_ARCH, f"experiment.output_dir={tmp_path}", *extra])  # fmt: skip


def test_toy_tables_hold_out_problems_and_mask_prompts(tmp_path, tok):
    cfg = _cfg(tmp_path)
    train, held_out = load_sft_table(cfg, tok, "train"), load_sft_table(cfg, tok, "eval")
    assert len(train) == 160 and len(held_out) == 40
    assert {tuple(e.ids) for e in train.examples}.isdisjoint(
        tuple(e.ids) for e in held_out.examples
    )
    ex = train.examples[0]
    problem = TOY_TASK.all_problems("train")[0]
    text = tok.decode(ex.ids)
    assert text == problem.prompt + problem.answer + tok.eos_token
    n_prompt = len(problem.prompt)
    np.testing.assert_array_equal(ex.loss_mask, [0] * n_prompt + [1] * (len(ex.ids) - n_prompt))


def _write_jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_chat_rows_mask_every_assistant_turn(tmp_path, tok):
    chat = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"},
            {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]  # fmt: skip
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}, {"prompt": "5-1=",
                        "response": "4"}])  # fmt: skip
    table = load_sft_table(_cfg(tmp_path, f"data.train_path={path}"), tok, "train")
    ex = table.examples[0]
    assert tok.decode(ex.ids) == "1+2=3<eos>2+2=4<eos>"
    np.testing.assert_array_equal(ex.loss_mask, [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1])
    assert tok.decode(table.examples[1].ids[table.examples[1].loss_mask > 0]) == "4<eos>"


def test_bad_input_gives_clear_errors(tmp_path, tok):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1+1=", "output": "2"}])
    with pytest.raises(DataError, match=r"a\.jsonl:1: the dataset has no key 'response' "
                       r"\(sft.response_key\).*'output'"):  # fmt: skip
        load_sft_table(_cfg(tmp_path, f"data.train_path={path}"), tok)
    rows = [{"prompt": "1+1=", "response": "2"}, {"prompt": "1+2=", "response": "  "}]
    path = _write_jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(DataError, match=r"b\.jsonl:2: response 'response' is empty"):
        load_sft_table(_cfg(tmp_path, f"data.train_path={path}", "data.strict=true"), tok)
    table = load_sft_table(_cfg(tmp_path, f"data.train_path={path}"), tok)  # not strict: skipped
    assert len(table) == 1 and table.stats.skipped["bad_value"] == 1
    path = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "1+1=", "response": ""}] * 2)
    with pytest.raises(DataError, match=r"no usable SFT examples.*c\.jsonl:1: response"):
        load_sft_table(_cfg(tmp_path, f"data.train_path={path}"), tok)


# --------------------------------------------------------------------------- trainer, export, PPO


def test_resume_is_exact(tmp_path):
    """3 steps straight == 2 steps, then a new trainer resuming from the checkpoint for 1."""
    from jaxrlhf.system.sft_trainer import SFTTrainer

    common = [
        "experiment.eval_every=0",
        "checkpoint.save_every=1",
        "data.batch_size=8",
        "logging.log_every=1",
    ]
    straight = SFTTrainer(_cfg(tmp_path / "a", "experiment.total_steps=3", *common))
    with straight.logger:
        straight.run()
    first = SFTTrainer(_cfg(tmp_path / "b", "experiment.total_steps=2", *common))
    with first.logger:
        first.run()
    resumed = SFTTrainer(_cfg(tmp_path / "b", "experiment.total_steps=3", *common))
    assert resumed.step == 2
    with resumed.logger:
        resumed.run()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.state.params),
                 jax.device_get(resumed.state.params))  # fmt: skip
    assert [h["train/loss"] for h in straight.history] == [h["train/loss"] for h in resumed.history]
    other = _cfg(tmp_path / "b", "experiment.total_steps=4", *common, "experiment.seed=5")
    with pytest.raises(Exception, match="made with other data or batching"):
        SFTTrainer(other)


def test_launcher_reports_bad_data(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "launchers" / "sft.py"))["main"]

    path = _write_jsonl(tmp_path / "a.jsonl", [{"question": "1+1=", "response": "2"}])
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(ROOT / "configs/sft_toy.yaml"), f"data.train_path={path}",
              f"experiment.output_dir={tmp_path}"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no key 'prompt' (data.prompt_key)" in err[0]


def test_sft_eval_loss_drops_and_ppo_starts_from_the_export(tmp_path):
    from jaxrlhf.system.coordinator import PPOCoordinator
    from jaxrlhf.system.sft_trainer import SFTTrainer

    cfg = _cfg(tmp_path / "sft", "experiment.total_steps=30", "experiment.eval_every=0",
               "actor.optimizer.warmup_steps=0", "actor.optimizer.schedule=constant")  # fmt: skip
    trainer = SFTTrainer(cfg)
    with trainer.logger:
        summary = trainer.run()
    assert summary["after"]["eval/loss"] < summary["before"]["eval/loss"] - 1.0
    export = summary["export"]
    assert Path(export, "config.json").is_file() and Path(export, "tokenizer.json").is_file()
    ppo_cfg = load_config(ROOT / "configs" / "toy_ppo.yaml", [
        f"actor.path={export}", "sft_warmup.steps=0", "experiment.total_steps=2",
        "experiment.eval_every=0", "data.batch_size=4", "data.eval_size=8",
        "generation.n_samples=2", "generation.max_new_tokens=4", "logging.progress=false",
        "generation.max_concurrent=8",
        f"experiment.output_dir={tmp_path / 'ppo'}",
    ])  # fmt: skip
    coordinator = PPOCoordinator(ppo_cfg)
    start = jax.device_get(coordinator.models.actor.params)
    jax.tree.map(np.testing.assert_array_equal, start, jax.device_get(trainer.state.params))
    with coordinator.logger:
        for _ in range(2):
            assert np.isfinite(coordinator.train_step()["actor/grad_norm"])
    assert coordinator.version == 2
