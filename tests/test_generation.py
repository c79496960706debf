"""Sampler and `generate`: HF greedy parity, behaviour log-probs, sampling statistics, sharding."""

import jax
import numpy as np
import pytest
import torch
import transformers
from scipy import stats

from jaxrlhf.generation import InvalidRequestError, generate, sampling
from jaxrlhf.generation.sampling import sample_tokens
from jaxrlhf.models import TransformerConfig, from_pretrained, init_model, make_mesh

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.1,  # wide logits: greedy near-ties would make parity luck-dependent
)

# One config per family, covering biases, tied / untied heads, MQA / GQA, qk-norm, rope scaling
# and sliding windows (window smaller than the sequences).
FAMILIES = {
    "llama_llama3_rope": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
    ),
    "llama_mqa_bias_tied": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
    "qwen2_tied": (
        transformers.Qwen2Config,
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    ),
    "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=24)),
    "mistral_window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=5)),
}

PROMPT_LENGTHS = (12, 7, 10, 3)
NEW_TOKENS = 40


def _hf_model(cls, kwargs, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cls(**BASE, **kwargs), attn_implementation="eager"
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    model.generation_config.eos_token_id = None  # forced length: never stop early
    return model.eval()


def _left_padded(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def _prompts(seed=0, lengths=PROMPT_LENGTHS, vocab=97):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


def _teacher_forced_logprobs(model, ids, mask, tokens, temperature=1.0):
    """log softmax(logits / T) of ``tokens`` from one full forward pass over prompt + tokens."""
    full = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    logits = np.asarray(model.logits(full, full_mask), np.float64) / temperature
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    width = ids.shape[1]
    return np.take_along_axis(logp[:, width - 1 : -1], tokens[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def tiny():
    """A random model with wide logits shared by the non-HF tests (one set of compilations)."""
    cfg = TransformerConfig(
        model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, qkv_bias=True, initializer_range=0.3,
    )  # fmt: skip
    return init_model(cfg, seed=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers_generate(family, tmp_path):
    """Token-for-token equal to HF greedy `generate` for 40 tokens, left-padded mixed lengths."""
    hf = _hf_model(*FAMILIES[family])
    hf.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    ids, mask = _left_padded(_prompts())
    out = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
        )[:, ids.shape[1] :].numpy()  # fmt: skip
    np.testing.assert_array_equal(out.tokens, expected)
    assert out.lengths.tolist() == [NEW_TOKENS] * 4
    assert out.finish_reasons == ("length",) * 4
    # behaviour log-probs of greedy decoding are the untempered teacher-forced ones
    tf = _teacher_forced_logprobs(model, ids, mask, out.tokens)
    np.testing.assert_allclose(out.logprobs, tf, atol=1e-5, rtol=0)


def test_sampled_logprobs_equal_teacher_forced(tiny):
    """Sampled tokens' behaviour log-probs equal log softmax(logits / T) within 1e-5 (f32)."""
    ids, mask = _left_padded(_prompts(1, (9, 4, 13)))
    T = 0.7
    out = generate(tiny, ids, mask, max_new_tokens=32, temperature=T, top_k=20, top_p=0.9, seed=3)
    tf = _teacher_forced_logprobs(tiny, ids, mask, out.tokens, T)
    np.testing.assert_allclose(out.logprobs, tf, atol=1e-5, rtol=0)
    # the truncated distribution renormalises a subset: its log-probs are never lower
    assert np.all(out.sampled_logprobs >= out.logprobs - 1e-6)
    assert np.any(out.sampled_logprobs > out.logprobs + 1e-3)
    assert np.all(out.versions == 0)


def _reference_probs(logits, T, top_k, top_p):
    """softmax(logits / T) restricted by HF-order top-k then top-p, renormalised (numpy)."""
    z = np.asarray(logits, np.float64) / T
    if top_k:
        z = np.where(z >= np.sort(z)[::-1][top_k - 1], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros_like(p, bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("candidates", [64, 2])
def test_top_k_top_p_mask_matches_reference(candidates, monkeypatch):
    """Kept sets equal the sort-based reference, via top-k candidates or the exact bisection."""
    monkeypatch.setattr(sampling, "TOP_CANDIDATES", candidates)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(24, 50)).astype(np.float32) * 2
    logits[3, :5] = logits[3, 5]  # ties at the threshold
    top_k = rng.choice([0, 1, 3, 7, 20, 49], 24).astype(np.int32)
    top_p = rng.choice([1.0, 0.95, 0.6, 0.3, 1e-3], 24).astype(np.float32)
    mask = np.asarray(jax.jit(sampling.top_k_top_p_mask)(logits, top_k, top_p))
    for b in range(24):
        expected = _reference_probs(logits[b], 1.0, top_k[b], top_p[b]) > 0
        np.testing.assert_array_equal(mask[b], expected, err_msg=f"row {b}")


@pytest.mark.parametrize(
    "T, top_k, top_p, candidates",
    [(1.0, 0, 1.0, 64), (0.6, 0, 1.0, 64), (1.3, 3, 1.0, 64), (0.9, 0, 0.7, 64), (1.0, 4, 0.8, 64),
     (1.3, 3, 1.0, 2), (0.9, 0, 0.7, 2)],
)  # fmt: skip
def test_sampling_frequencies_chi_square(T, top_k, top_p, candidates, monkeypatch):
    """Empirical frequencies over an 8-token vocabulary match the warped softmax (fixed seeds)."""
    monkeypatch.setattr(sampling, "TOP_CANDIDATES", candidates)
    logits = np.asarray([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
    n = 20000
    keys = jax.random.split(jax.random.key(7), n)
    uniforms = jax.vmap(lambda k: jax.random.uniform(k))(keys)
    fn = jax.jit(sample_tokens, static_argnames="mode")
    tokens, logprobs, sampled = fn(
        np.broadcast_to(logits, (n, 8)), np.full(n, T, np.float32), np.full(n, top_k, np.int32),
        np.full(n, top_p, np.float32), uniforms, mode="filtered",
    )  # fmt: skip
    expected = _reference_probs(logits, T, top_k, top_p)
    counts = np.bincount(np.asarray(tokens), minlength=8)
    assert counts[expected == 0].sum() == 0, "sampled a token outside the top-k / top-p set"
    support = expected > 0
    chi2, p_value = stats.chisquare(counts[support], n * expected[support])
    assert p_value > 1e-3, (counts, n * expected, chi2)
    # log-probs: full tempered softmax, and the truncated distribution actually sampled
    full = logits / T - np.log(np.exp(logits / T).sum())
    tok = np.asarray(tokens)
    np.testing.assert_allclose(np.asarray(logprobs), full[tok], atol=1e-5)
    np.testing.assert_allclose(np.asarray(sampled), np.log(expected[tok]), atol=1e-5)


def test_first_token_distribution_end_to_end(tiny):
    """n samples of one prompt through prefill + decode follow softmax(logits / T) top-k."""
    prompt = _prompts(2, (6,))[0]
    T, k, n = 0.8, 5, 1024
    out = generate(tiny, [prompt], max_new_tokens=1, temperature=T, top_k=k, n=n, seed=11)
    logits = np.asarray(tiny.logits([prompt]))[0, -1]
    expected = _reference_probs(logits, T, k, 1.0)
    counts = np.bincount(out.tokens[:, 0], minlength=expected.size)
    support = expected > 0
    assert counts[~support].sum() == 0
    assert stats.chisquare(counts[support], n * expected[support]).pvalue > 1e-3


def test_seeds_stop_tokens_and_n_samples(tiny):
    """Per-seed reproducibility, samples sharing a prefill differ, EOS / stop ids end rows."""
    ids, mask = _left_padded(_prompts(3, (5, 8)))
    kw = dict(max_new_tokens=24, temperature=1.0, n=3)
    a = generate(tiny, ids, mask, seed=5, **kw)
    b = generate(tiny, ids, mask, seed=5, **kw)
    c = generate(tiny, ids, mask, seed=6, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.tokens.shape == (6, 24) and a.num_samples == 3
    assert not np.array_equal(a.tokens, c.tokens)
    assert len({tuple(r) for r in a.tokens[:3]}) > 1  # the samples of prompt 0 differ

    greedy = generate(tiny, ids, mask, max_new_tokens=24)
    eos = int(greedy.tokens[0, 5])  # a token row 0 produces at step 5
    stopped = generate(tiny, ids, mask, max_new_tokens=24, eos_token_id=eos)
    first = int(np.argmax(greedy.tokens[0] == eos))
    assert stopped.lengths[0] == first + 1 and stopped.finish_reasons[0] == "stop"
    np.testing.assert_array_equal(stopped.tokens[0, : first + 1], greedy.tokens[0, : first + 1])
    assert np.all(stopped.tokens[0, first + 1 :] == 0) and np.all(
        stopped.versions[0, first + 1 :] == -1
    )
    # min_new_tokens bans the stop ids until that many tokens exist
    late = generate(
        tiny, ids, mask, max_new_tokens=24, stop_token_ids=[eos], min_new_tokens=first + 2
    )
    assert eos not in late.tokens[0, : first + 1].tolist()
    assert late.lengths[0] >= first + 2


def test_sharded_generate_matches_single_device(tiny):
    """data=2 x tensor=2 on 4 CPU devices: same tokens and log-probs as one device."""
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    sharded = init_model(tiny.config, seed=0, mesh=mesh)
    ids, mask = _left_padded(_prompts(4, (7, 3, 9, 5)))
    kw = dict(max_new_tokens=20, temperature=0.9, seed=1)
    single, multi = generate(tiny, ids, mask, **kw), generate(sharded, ids, mask, **kw)
    np.testing.assert_array_equal(multi.tokens, single.tokens)
    np.testing.assert_allclose(multi.logprobs, single.logprobs, atol=1e-5)


def test_generate_bad_input(tiny):
    with pytest.raises(InvalidRequestError, match="row 1: prompt is empty"):
        generate(tiny, [[1, 2], [0, 0]], [[1, 1], [0, 0]], max_new_tokens=4)
    with pytest.raises(InvalidRequestError, match="max_new_tokens=0"):
        generate(tiny, [[1, 2]], max_new_tokens=0)
    with pytest.raises(InvalidRequestError, match=r"top_p=1.5 is outside \(0, 1\]"):
        generate(tiny, [[1, 2]], max_new_tokens=4, top_p=1.5)
    with pytest.raises(InvalidRequestError, match="input_ids must be"):
        generate(tiny, [1, 2], max_new_tokens=4)


def test_generate_refuses_what_it_would_truncate_or_overflow(tiny):
    """Float ids are refused (never truncated), as are min > max new tokens, a seed beyond
    JAX's 64-bit range and ids outside the vocabulary; all before any device work."""
    cases = {
        "input_ids must hold integer token ids; got dtype float64": dict(
            input_ids=np.array([[1.0, 2.7]])),
        "input_ids must hold integer token ids; got dtype bool": dict(
            input_ids=np.array([[True, False]])),
        "row 0: min_new_tokens=5 is more than max_new_tokens=4": dict(
            input_ids=[[1, 2]], min_new_tokens=5),
        r"row 0: seed=1180591620717411303424 is invalid": dict(input_ids=[[1, 2]], seed=2**70),
        r"row 1: prompt token id -3 is outside \[0, 97\)": dict(input_ids=[[1, 2], [4, -3]]),
        r"input_ids must be \[batch, seq\]; got shape \(0, 3\)": dict(
            input_ids=np.zeros((0, 3), np.int32)),
    }  # fmt: skip
    for msg, kwargs in cases.items():
        with pytest.raises(InvalidRequestError, match=msg):
            generate(tiny, max_new_tokens=4, **kwargs)


def _pooled_chi_square(counts, expected_counts, min_expected=5.0):
    """Chi-square p-value with tokens of small expected count pooled into one bin."""
    big = expected_counts >= min_expected
    obs = np.r_[counts[big], counts[~big].sum()]
    exp = np.r_[expected_counts[big], expected_counts[~big].sum()]
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.mark.parametrize(
    "T, top_k, top_p, mode",
    [(1.0, 0, 1.0, "sample"), (0.7, 0, 1.0, "filtered"), (1.0, 40, 1.0, "filtered"),
     (1.0, 300, 1.0, "filtered"), (1.2, 0, 0.9, "filtered"), (1.0, 0, 0.995, "filtered"),
     (0.9, 100, 0.8, "filtered")],
)  # fmt: skip
def test_multi_block_sampling_chi_square(T, top_k, top_p, mode):
    """V = 1000 spans 8 CDF blocks of 128 (the last one partial): token and block frequencies
    match the exact warped softmax (top-k 300 and top-p 0.995 take the bisection fallback)."""
    V, rows, calls = 1000, 20000, 3
    rng = np.random.default_rng(11)
    logits = rng.normal(size=V).astype(np.float32)
    hot = rng.choice(V, 60, replace=False)  # mass in every block, not just the first
    logits[hot] += rng.uniform(2.0, 4.0, 60).astype(np.float32)
    expected = _reference_probs(logits, T, top_k, top_p)
    fn = jax.jit(sample_tokens, static_argnames="mode")
    counts = np.zeros(V, np.int64)
    for c in range(calls):
        keys = jax.random.split(jax.random.key(100 + c), rows)
        uniforms = jax.vmap(lambda k: jax.random.uniform(k))(keys)
        tokens, _, sampled = fn(
            np.broadcast_to(logits, (rows, V)), np.full(rows, T, np.float32),
            np.full(rows, top_k, np.int32), np.full(rows, top_p, np.float32), uniforms, mode=mode,
        )  # fmt: skip
        tok = np.asarray(tokens)
        counts += np.bincount(tok, minlength=V)
        np.testing.assert_allclose(np.asarray(sampled), np.log(expected[tok]), atol=1e-4)
    n = rows * calls
    assert counts[expected == 0].sum() == 0, "sampled a token outside the top-k / top-p set"
    assert len(np.unique(np.flatnonzero(counts) // 128)) >= 6  # the draws cover the blocks
    assert _pooled_chi_square(counts, n * expected) > 1e-3
    blocks = np.bincount(np.arange(V) // 128, weights=counts)
    block_mass = np.bincount(np.arange(V) // 128, weights=expected)
    assert _pooled_chi_square(blocks, n * block_mass) > 1e-3
