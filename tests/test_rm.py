"""Reward models: the Bradley-Terry loss against NumPy, the two-pass gradient against a padded
whole-batch reference, pair data and bad input, the toy run (held-out accuracy > 0.9), the HF
export read back by us and by transformers, and PPO scoring samples with the exported model."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from interfaces_reference import TINY, assert_tree_close, padded_batch, ref_values

from jaxrlhf.algorithms import bradley_terry
from jaxrlhf.config import ConfigError, load_config
from jaxrlhf.data.pipeline import load_tokenizer
from jaxrlhf.data.readers import DataError
from jaxrlhf.data.sft import load_pair_table
from jaxrlhf.interfaces import batch_gradients, compute_scores, put_batch, unpack_scalars
from jaxrlhf.interfaces.rm import RMLossSpec, pack_pairs, rm_microbatch_loss
from jaxrlhf.models import init_model

ROOT = Path(__file__).resolve().parents[1]


def _np_bt(chosen, rejected):
    """NumPy reference: mean −log σ(c − r), accuracy, margin."""
    d = np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64)
    loss = np.mean(np.log1p(np.exp(-d)))
    return loss, np.mean(d > 0), np.mean(d)


def test_bradley_terry_matches_numpy():
    rng = np.random.default_rng(0)
    c, r = rng.normal(size=11) * 3, rng.normal(size=11) * 3
    valid = np.ones(16, np.float32)
    valid[11:] = 0.0  # padding pairs (garbage scores) must not count
    pad = lambda x: np.concatenate([x, rng.normal(size=5) * 50])
    loss, m = bradley_terry(pad(c), pad(r), valid)
    ref_loss, ref_acc, ref_margin = _np_bt(c, r)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(float(m["accuracy"]), ref_acc)
    np.testing.assert_allclose(float(m["margin"]), ref_margin, rtol=1e-5)
    assert float(m["pairs"]) == 11
    big, _ = bradley_terry(np.array([0.0, 100.0]), np.array([100.0, 0.0]))  # stable at ±100
    np.testing.assert_allclose(float(big), 50.0, rtol=1e-6)


@pytest.fixture(scope="module")
def rm_model():
    handle = init_model(TINY, seed=4, lm_head=False, value_head=True)
    params = dict(handle.params)
    params["value_head"] = {"kernel": jax.random.normal(jax.random.key(2), (TINY.hidden_size,)),
                            "bias": jnp.asarray(0.3)}  # fmt: skip
    return params


@pytest.fixture(scope="module")
def pairs_data():
    rng = np.random.default_rng(3)
    draw = lambda: rng.integers(0, TINY.vocab_size, size=rng.integers(3, 16)).astype(np.int32)
    return [draw() for _ in range(7)], [draw() for _ in range(7)]


def test_two_pass_gradient_matches_padded_reference(rm_model, pairs_data):
    """Pairs straddling micro-batches: loss and gradient equal those of the whole-batch BT loss
    on a padded batch (one forward, score at each row's last real token)."""
    chosen, rejected = pairs_data
    packed, pairs = pack_pairs(chosen, rejected, max_tokens_per_mb=32, row_len=16)
    assert packed.num_microbatches > 2
    mb_of = lambda slot: slot // packed.arrays["seq_lens"].shape[1]
    split = [mb_of(c) != mb_of(r) for c, r in zip(pairs["chosen"][:7], pairs["rejected"][:7],
                                                   strict=True)]  # fmt: skip
    assert any(split)
    fn = jax.jit(
        lambda p, b, q: batch_gradients(rm_microbatch_loss, p, b, q, cfg=TINY, spec=RMLossSpec())
    )
    grads, metrics = fn(rm_model, put_batch(packed, None), pairs)

    seqs = [s for pair in zip(chosen, rejected, strict=True) for s in pair]
    ids, attn, _ = padded_batch(seqs, {}, 16)

    def reference(params):
        scores = ref_values(params, TINY, ids, attn)[1]
        return jnp.mean(jax.nn.softplus(-(scores[0::2] - scores[1::2]))), scores

    (ref_loss, scores), ref_grads = jax.value_and_grad(reference, has_aux=True)(rm_model)
    np_loss, np_acc, _ = _np_bt(scores[0::2], scores[1::2])
    np.testing.assert_allclose(float(metrics["loss"]), np_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np_acc)
    assert_tree_close(grads, ref_grads, atol=2e-6, rtol=1e-4)
    assert float(grads["value_head"]["bias"]) == 0.0  # BT is shift-invariant: bias pinned


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _cfg(tmp_path, *extra):
    overrides = [f"experiment.output_dir={tmp_path}", "logging.progress=false", *extra]
    return load_config(ROOT / "configs" / "rm_toy.yaml", overrides)


def test_toy_pairs_hold_out_combinations(tmp_path, tok):
    cfg = _cfg(tmp_path)
    train, held_out = load_pair_table(cfg, tok, "train"), load_pair_table(cfg, tok, "eval")
    key = lambda e: (tuple(e.chosen), tuple(e.rejected))
    assert len(held_out) > 500 and not {key(e) for e in train.examples} & {
        key(e) for e in held_out.examples
    }
    ex = train.examples[0]
    a, b = tok.decode(ex.chosen), tok.decode(ex.rejected)
    prompt, correct = a[: a.index("=") + 1], a[a.index("=") + 1 : -len("<eos>")]
    assert b.startswith(prompt) and b.endswith("<eos>") and eval(prompt[:-1]) == int(correct)
    assert b[len(prompt) : -len("<eos>")] != correct


def _write_jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_bad_pairs_give_clear_errors(tmp_path, tok):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
            {"prompt": "1+2=", "chosen": "3", "rejected": ""}]  # fmt: skip
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=r"p\.jsonl:2: response 'rejected' is empty; a pair needs"):
        load_pair_table(_cfg(tmp_path, f"data.train_path={path}", "data.strict=true"), tok)
    assert len(load_pair_table(_cfg(tmp_path, f"data.train_path={path}"), tok)) == 1
    path = _write_jsonl(tmp_path / "q.jsonl", [{"prompt": "1+1=", "good": "2", "bad": "3"}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: the dataset has no key 'chosen' "
                       r"\(rm.chosen_key\)"):  # fmt: skip
        load_pair_table(_cfg(tmp_path, f"data.train_path={path}"), tok)
    # chat-message pairs (no prompt key): the last assistant turn is the response
    chat = lambda answer: [{"role": "user", "content": "2+2="},
                           {"role": "assistant", "content": answer}]  # fmt: skip
    path = _write_jsonl(tmp_path / "m.jsonl", [{"chosen": chat("4"), "rejected": chat("5")}])
    ex = load_pair_table(_cfg(tmp_path, f"data.train_path={path}"), tok).examples[0]
    assert (tok.decode(ex.chosen), tok.decode(ex.rejected)) == ("2+2=4<eos>", "2+2=5<eos>")


# --------------------------------------------------------------------------- toy run, export, PPO


def test_rm_step_needs_its_pairs(pairs_data):
    """The reward-model step's whole-batch input is checked on the host, before compiling."""
    from jaxrlhf.interfaces import run_train_step
    from jaxrlhf.optim import OptimizerSpec

    packed, pairs = pack_pairs(*pairs_data, max_tokens_per_mb=32, row_len=16)
    step = lambda aux: run_train_step(rm_microbatch_loss, None, packed, aux, cfg=TINY,
                                      spec=RMLossSpec(), opt=OptimizerSpec())  # fmt: skip
    with pytest.raises(ValueError, match=r"rm: expected inputs \['chosen', 'rejected', 'valid'\]"):
        step(None)
    with pytest.raises(ValueError, match=r"got \['chosen', 'valid'\]"):
        step({k: pairs[k] for k in ("chosen", "valid")})


def test_loading_a_model_without_reward_head_is_refused(tmp_path):
    from jaxrlhf.models import save_pretrained
    from jaxrlhf.system.reward_model import load_reward_model

    save_pretrained(init_model(TINY, seed=0), str(tmp_path / "lm"))
    with pytest.raises(ConfigError, match=r"has no reward head \(tensor 'score.weight'\)"):
        load_reward_model(str(tmp_path / "lm"))


def test_toy_run_export_and_ppo_with_the_reward_model(tmp_path, tok):
    """One test (one training run, a few dozen seconds): the toy config, shortened to 200 steps,
    ranks held-out pairs (> 0.9); its export reads back bit-exactly in jaxrlhf and as an HF sequence
    classifier; PPO scores samples with it, and the scores reach the advantages with the
    configured weights (reward/total_mean is the weighted sum the estimator receives)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from jaxrlhf.interfaces import pack_sequences
    from jaxrlhf.system.coordinator import PPOCoordinator
    from jaxrlhf.system.reward_model import load_reward_model
    from jaxrlhf.system.rm_trainer import RMTrainer

    fast = ["experiment.total_steps=200", "experiment.eval_every=0", "checkpoint.save_every=0"]
    trainer = RMTrainer(_cfg(tmp_path / "rm", *fast))
    with trainer.logger:
        summary = trainer.run()
    assert summary["before"]["eval/accuracy"] < 0.75
    assert summary["after"]["eval/accuracy"] > 0.9
    assert summary["after"]["eval/margin"] > 1.0

    export = summary["export"]
    handle = load_reward_model(export)
    ids = [np.asarray(tok("3+4=7")["input_ids"] + [tok.eos_token_id], np.int32),
           np.asarray(tok("3+4=8")["input_ids"] + [tok.eos_token_id], np.int32)]  # fmt: skip
    packed = pack_sequences(ids, max_tokens_per_mb=64)
    ours = unpack_scalars(packed, compute_scores(handle.params, handle.config, packed)["scores"])
    trained_scores = compute_scores(trainer.state.params, trainer.handle.config, packed)["scores"]
    np.testing.assert_array_equal(ours, unpack_scalars(packed, trained_scores))
    hf = AutoModelForSequenceClassification.from_pretrained(export)
    with torch.no_grad():
        logits = [hf(torch.tensor(x[None].astype(np.int64))).logits[0, 0].item() for x in ids]
    np.testing.assert_allclose(logits, ours, atol=2e-4, rtol=2e-4)

    cfg = load_config(ROOT / "configs" / "toy_ppo.yaml", [
        "reward_model.enabled=true", f"reward_model.path={export}", "reward_model.weight=2.0",
        "reward_model.rule_weight=0.5", "sft_warmup.steps=2", "sft_warmup.batch_size=4",
        "experiment.total_steps=2", "data.batch_size=4", "generation.n_samples=2",
        "generation.max_new_tokens=4", "logging.progress=false", "generation.max_concurrent=8",
        f"experiment.output_dir={tmp_path / 'ppo'}",
    ])  # fmt: skip
    coordinator = PPOCoordinator(cfg)
    assert "rm_inf" in coordinator.graph.order
    with coordinator.logger:
        history = [coordinator.train_step() for _ in range(2)]
    for m in history:
        expected = 0.5 * m["reward/mean"] + 2.0 * m["reward/rm_mean"]
        np.testing.assert_allclose(m["reward/total_mean"], expected, rtol=1e-5, atol=1e-6)
        assert m["reward/rm_std"] > 0
