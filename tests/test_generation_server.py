"""Generation server and manager: continuous batching, interruptible weight updates, bad input."""

import jax
import numpy as np
import pytest

from jaxrlhf.generation import (
    GenerationManager,
    GenerationServer,
    InvalidRequestError,
    SamplingParams,
    generate,
)
from jaxrlhf.models import ModelHandle, TransformerConfig, init_model, make_mesh

CFG = TransformerConfig(
    model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, qkv_bias=True, initializer_range=0.3,
)  # fmt: skip
SLOTS, SEQ_LEN, CHUNK = 4, 64, 4


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=0)


@pytest.fixture(scope="module")
def other_params():
    return init_model(CFG, seed=1).params


def _server(model, cls=GenerationServer, **kw):
    kw = dict(max_slots=SLOTS, max_seq_len=SEQ_LEN, decode_chunk=CHUNK, threaded=False) | kw
    return cls(model, **kw)


def _requests(seed, count):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 97, rng.integers(1, 20)).tolist() for _ in range(count)]
    news = [int(k) for k in rng.integers(1, 30, count)]
    return prompts, news


def _teacher_forced(params, prompt, tokens, temperature=1.0):
    logits = np.asarray(ModelHandle(CFG, params).logits([list(prompt) + list(tokens)]))[0]
    logits = logits.astype(np.float64) / temperature
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    return logp[len(prompt) - 1 : -1][np.arange(len(tokens)), tokens]


def test_continuous_batching_equals_one_at_a_time(model):
    """Random arrival order over 4 slots gives each request's one-at-a-time greedy output."""
    prompts, news = _requests(0, 10)
    alone = _server(model)
    expected = [
        alone.generate([p], SamplingParams(max_new_tokens=k))[0]
        for p, k in zip(prompts, news, strict=True)
    ]

    server = _server(model)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(prompts))
    handles = {}
    for i in order:  # a few decode chunks between arrivals
        handles[i] = server.submit(prompts[i], SamplingParams(max_new_tokens=news[i]))
        for _ in range(rng.integers(0, 3)):
            server.step()
    server.run_until_idle()
    for i, want in enumerate(expected):
        got = handles[i].result().completions[0]
        np.testing.assert_array_equal(got.tokens, want.completions[0].tokens)
        np.testing.assert_allclose(got.logprobs, want.completions[0].logprobs, atol=1e-5)
        assert got.finish_reason == "length" and len(got.tokens) == news[i]
    # and one-at-a-time equals the batch `generate` path
    ref = generate(model, [prompts[0]], max_new_tokens=news[0])
    np.testing.assert_array_equal(expected[0].completions[0].tokens, ref.tokens[0])
    health = server.health()
    assert health["completed"] == 10 and health["running"] == health["queued"] == 0
    assert health["tokens_generated"] == sum(news)


def test_sampled_requests_reproducible_across_batching(model):
    """A seeded request's samples do not depend on what else is in the batch."""
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=4)
    server = _server(model)
    noise = [server.submit(p, SamplingParams(max_new_tokens=k, temperature=0.5)) for p, k in
             zip(*_requests(2, 3), strict=True)]  # fmt: skip
    busy = server.submit(prompt, params)
    server.run_until_idle()
    quiet = _server(model).generate([prompt], params)[0]
    ref = generate(model, [prompt], max_new_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=4)
    for j, completion in enumerate(busy.result().completions):
        np.testing.assert_array_equal(completion.tokens, quiet.completions[j].tokens)
        np.testing.assert_array_equal(completion.tokens, ref.tokens[j])
    assert all(h.result().completions for h in noise)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_weight_update_mid_request(model, other_params, temperature):
    """Tokens carry both versions; each log-prob is the teacher-forced one of its version."""
    server = _server(model)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    handle = server.submit(
        prompt, SamplingParams(max_new_tokens=20, temperature=temperature, seed=0)
    )
    server.step()
    server.step()  # two chunks under version 0
    server.update_weights(other_params, version=1)
    server.run_until_idle()
    out = handle.result().completions[0]
    assert out.versions.tolist() == [0] * 2 * CHUNK + [1] * (20 - 2 * CHUNK)
    assert server.version == 1
    T = temperature or 1.0
    old = _teacher_forced(model.params, prompt, out.tokens, T)
    new = _teacher_forced(other_params, prompt, out.tokens, T)
    v0 = out.versions == 0
    np.testing.assert_allclose(out.logprobs[v0], old[v0], atol=1e-5)
    np.testing.assert_allclose(out.logprobs[~v0], new[~v0], atol=1e-5)
    assert np.abs(out.logprobs[~v0] - old[~v0]).max() > 1e-2  # the versions really differ


class _HookedRound(GenerationServer):
    """Runs ``hook`` once inside a scheduling round, after the round has taken its pending
    weight update (none) and before it admits requests."""

    hook = None

    def _admit(self):
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        super()._admit()


def test_request_submitted_after_an_update_never_runs_under_older_weights(model, other_params):
    """An update and a submission that land inside a round begun under v0: the request waits
    for the next round, which applies v1, and every token is v1 (it used to be admitted at
    once and decode under v0: the async PPO staleness race)."""
    server = _server(model, cls=_HookedRound)
    running = server.submit([5, 6, 7], SamplingParams(max_new_tokens=3 * CHUNK))
    server.step()  # v0 decodes `running`
    late = []

    def publish_then_submit():
        server.update_weights(other_params, version=1)
        late.append(server.submit([1, 2, 3], SamplingParams(max_new_tokens=CHUNK)))

    server.hook = publish_then_submit
    server.step()  # the round that began under v0: `late` is queued, not admitted
    assert server.health()["queued"] == 1
    server.run_until_idle()
    assert late[0].result().completions[0].versions.tolist() == [1] * CHUNK
    versions = running.result().completions[0].versions.tolist()
    assert versions == [0] * 2 * CHUNK + [1] * CHUNK  # in flight: both rounds ran v0


def test_prefill_in_fixed_row_chunks(model, other_params):
    """Prefill in calls of 1 or 3 rows (fewer than the contexts waiting, of mixed lengths, with
    sampled groups sharing a row, and every in-flight sequence re-prefilled after a weight
    update) gives the same tokens and log-probs as one call of all rows."""
    prompts, news = _requests(3, 6)
    params = [SamplingParams(max_new_tokens=k, temperature=1.0, seed=7, n=2) for k in news]
    outs = {}
    for rows in (1, 3, SLOTS):
        server = _server(model, prefill_rows=rows)
        assert server.prefill_rows == rows
        handles = [server.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        server.step()
        server.update_weights(other_params, version=1)  # re-prefills the in-flight rows
        server.run_until_idle()
        outs[rows] = [c for h in handles for c in h.result().completions]
    for rows in (1, 3):
        for got, want in zip(outs[rows], outs[SLOTS], strict=True):
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
            np.testing.assert_array_equal(got.versions, want.versions)
    assert any(1 in c.versions and 0 in c.versions for c in outs[SLOTS])  # spans the update
    with pytest.raises(ValueError, match="prefill_rows=0"):
        _server(model, prefill_rows=0)


def test_bad_requests_get_errors_and_server_keeps_serving(model):
    server = _server(model)
    ok = SamplingParams(max_new_tokens=5)
    bad = {
        "prompt is empty": ([], ok),
        "needs 68 cache slots, more than max_seq_len=64": (
            [1] * 60,
            SamplingParams(max_new_tokens=9),
        ),
        "max_new_tokens=0 is invalid": ([1, 2], SamplingParams(max_new_tokens=0)),
        "max_new_tokens=-3 is invalid": ([1, 2], SamplingParams(max_new_tokens=-3)),
        r"top_p=0 is outside \(0, 1\]": ([1, 2], SamplingParams(max_new_tokens=5, top_p=0)),
        r"top_p=1.2 is outside \(0, 1\]": ([1, 2], SamplingParams(max_new_tokens=5, top_p=1.2)),
        "temperature=-1": ([1, 2], SamplingParams(max_new_tokens=5, temperature=-1.0)),
        r"token id 97 is outside \[0, 97\)": ([1, 97], ok),
        "integer token ids": (["a"], ok),
    }
    good_before = server.submit([1, 2, 3], ok)
    handles = {msg: server.submit(*args) for msg, args in bad.items()}
    good_after = server.submit([4, 5], ok)
    server.run_until_idle()
    for msg, handle in handles.items():
        with pytest.raises(InvalidRequestError, match=msg):
            handle.result()
    assert len(good_before.result().completions[0].tokens) == 5
    assert len(good_after.result().completions[0].tokens) == 5
    assert server.health()["rejected"] == len(bad)


def test_every_bad_request_gets_a_failed_handle_and_submit_never_raises(model):
    """The submit contract: each refused request returns a done handle whose result() raises
    one sentence naming the value; in-range edge values (the 64-bit seed bounds, the last
    sample index, min_new_tokens == max_new_tokens) run."""
    ok = SamplingParams(max_new_tokens=5)
    bad = {
        r"seed=1180591620717411303424 is invalid; expected None or an integer in \[-2\*\*63": (
            [1, 2], SamplingParams(max_new_tokens=3, seed=2**70)),
        r"seed=-9223372036854775809 is invalid": (
            [1, 2], SamplingParams(max_new_tokens=3, seed=-(2**63) - 1)),
        r"seed=1.5 is invalid": ([1, 2], SamplingParams(max_new_tokens=3, seed=1.5)),
        r"seed=True is invalid": ([1, 2], SamplingParams(max_new_tokens=3, seed=True)),
        r"integer token ids; got 2.5 at position 1": ([1, 2.5], ok),
        r"integer token ids; got 1.0 at position 0": ([1.0, 2], ok),
        r"integer token ids; got dtype float32": (np.array([1, 2], np.float32), ok),
        r"integer token ids; got True at position 0": ([True, 2], ok),
        r"integer token ids; got '3' at position 0": (["3"], ok),
        r"sequence of integer token ids; got str": ("12", ok),
        r"integer token ids; got \[1, 2\] at position 0": ([[1, 2]], ok),
        r"one sequence of integer token ids; got shape \(1, 2\)": (np.array([[1, 2]]), ok),
        r"sequence of integer token ids; got NoneType": (None, ok),
        r"token id -1 is outside \[0, 97\)": ([3, -1], ok),
        r"token id 2361183241434822606848 is outside": ([2**71], ok),
        r"min_new_tokens=6 is more than max_new_tokens=5": (
            [1], SamplingParams(max_new_tokens=5, min_new_tokens=6)),
        r"stop token id 1.5 is not an integer": (
            [1], SamplingParams(max_new_tokens=5, stop_token_ids=(1.5,))),
        r"sample_offset=-1 is invalid": ([1], SamplingParams(max_new_tokens=5, sample_offset=-1)),
        r"sample_offset=4294967295 \+ n=2 exceeds": (
            [1], SamplingParams(max_new_tokens=5, sample_offset=2**32 - 1, n=2)),
        r"top_k=2.0 is invalid": ([1], SamplingParams(max_new_tokens=5, top_k=2.0)),
        r"n=0 is invalid": ([1], SamplingParams(max_new_tokens=5, n=0)),
        r"temperature=nan is invalid": ([1], SamplingParams(max_new_tokens=5, temperature=np.nan)),
        r"sampling params must be a SamplingParams, got dict": ([1], {"max_new_tokens": 5}),
    }  # fmt: skip
    server = _server(model)
    handles = {}
    for msg, args in bad.items():
        handles[msg] = server.submit(*args)  # never raises
        assert handles[msg].done(), msg
    named = server.submit([1], ok, request_id=7)
    assert named.done()
    edge = {
        "seed_high": SamplingParams(max_new_tokens=2, seed=2**63 - 1),
        "seed_low": SamplingParams(max_new_tokens=2, seed=-(2**63)),
        "last_sample_index": SamplingParams(max_new_tokens=2, sample_offset=2**32 - 1),
        "min_equals_max": SamplingParams(max_new_tokens=3, min_new_tokens=3, seed=1),
    }
    good = {k: server.submit(np.array([4, 5], np.int64), p) for k, p in edge.items()}
    server.run_until_idle()
    for msg, handle in handles.items():
        with pytest.raises(InvalidRequestError, match=msg):
            handle.result()
        assert "\n" not in str(handle.exception())
    with pytest.raises(InvalidRequestError, match="request_id 7 is not a string"):
        named.result()
    for key, handle in good.items():
        assert len(handle.result().completions[0].tokens) == edge[key].max_new_tokens, key
    assert server.health()["rejected"] == len(bad) + 1


def test_prompt_longer_than_the_model_positions_is_refused(model):
    """max_position_embeddings bounds a request even when the cache (max_seq_len) is larger:
    the prompt plus max_new_tokens - 1 fed tokens must fit it."""
    import dataclasses

    short = ModelHandle(dataclasses.replace(CFG, max_position_embeddings=64), model.params)
    server = _server(short, max_seq_len=256)
    too_long = server.submit(list(range(90)) + list(range(60)), SamplingParams(max_new_tokens=4))
    one_over = server.submit([1] * 60, SamplingParams(max_new_tokens=6))
    fits = server.submit([1] * 60, SamplingParams(max_new_tokens=5))  # 64 positions exactly
    with pytest.raises(
        InvalidRequestError,
        match="prompt of 150 tokens plus max_new_tokens=4 needs 153 positions, more than the "
        "model's max_position_embeddings=64",
    ):
        too_long.result()
    with pytest.raises(InvalidRequestError, match="needs 65 positions"):
        one_over.result()
    assert not fits.done()
    server.close()
    with pytest.raises(RuntimeError, match="closed before the request ended"):
        fits.result()
    with pytest.raises(InvalidRequestError, match="needs 153 positions, more than the model's"):
        generate(short, [list(range(90)) + list(range(60))], max_new_tokens=4)


def test_device_failure_fails_running_requests_only(model, monkeypatch):
    server = _server(model)
    first = server.submit([1, 2, 3], SamplingParams(max_new_tokens=8))
    original = server._sampler.decode
    calls = iter([RuntimeError("injected device fault")])

    def flaky(*args, **kwargs):
        error = next(calls, None)
        if error is not None:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(server._sampler, "decode", flaky)
    server.step()
    with pytest.raises(RuntimeError, match="injected device fault"):
        first.result()
    second = server.submit([1, 2, 3], SamplingParams(max_new_tokens=8))
    server.run_until_idle()
    ref = generate(model, [[1, 2, 3]], max_new_tokens=8)
    np.testing.assert_array_equal(second.result().completions[0].tokens, ref.tokens[0])
    assert "injected device fault" in server.health()["last_error"]


def test_abort_running_and_queued(model):
    server = _server(model, max_slots=1)
    running = server.submit([1, 2, 3], SamplingParams(max_new_tokens=40))
    queued = server.submit([4, 5], SamplingParams(max_new_tokens=4))
    server.step()
    assert server.abort(running.request_id) and server.abort(queued.request_id)
    assert not server.abort("no-such-request")
    server.run_until_idle()
    out = running.result().completions[0]
    assert out.finish_reason == "abort" and len(out.tokens) == CHUNK
    assert queued.result().completions[0].finish_reason == "abort"
    assert len(queued.result().completions[0].tokens) == 0


def test_threaded_pause_resume_and_update(model, other_params):
    """Background thread: paused servers hold requests; an update while paused applies."""
    with GenerationServer(model, max_slots=SLOTS, max_seq_len=SEQ_LEN, decode_chunk=CHUNK) as s:
        s.pause()
        handles = [
            s.submit(p, SamplingParams(max_new_tokens=k))
            for p, k in zip(*_requests(3, 6), strict=True)
        ]
        assert s.health()["queued"] == 6 and not any(h.done() for h in handles)
        s.update_weights(other_params, version=7, wait=True)
        assert s.version == 7
        s.resume()
        outs = [h.result(timeout=120) for h in handles]
    assert all(set(o.completions[0].versions.tolist()) == {7} for o in outs)
    assert not s.health()["alive"]
    with pytest.raises(RuntimeError, match="closed"):
        s.submit([1], SamplingParams(max_new_tokens=1)).result()


def test_manager_balances_and_reports_health(model, other_params):
    """Servers on disjoint devices (one, and a 2-device sub-mesh); least-loaded; fan-out update."""
    mesh = make_mesh(data=2, devices=jax.devices()[2:4])
    kw = dict(max_slots=SLOTS, max_seq_len=SEQ_LEN, decode_chunk=CHUNK, threaded=False)
    servers = [
        GenerationServer(model, name="gen0", **kw),
        GenerationServer(init_model(CFG, seed=0, mesh=mesh), name="gen1", **kw),
    ]
    manager = GenerationManager(servers)
    prompts, news = _requests(4, 6)
    handles = [
        manager.submit(p, SamplingParams(max_new_tokens=k))
        for p, k in zip(prompts, news, strict=True)
    ]
    assert [s.load() for s in servers] == [3, 3]
    manager.update_weights(other_params, version=2)
    for server in servers:
        server.run_until_idle()
    ref = generate(init_model(CFG, seed=1), [prompts[0]], max_new_tokens=news[0])
    first = handles[0].result().completions[0]
    np.testing.assert_array_equal(first.tokens, ref.tokens[0])
    assert set(first.versions.tolist()) == {2}
    health = manager.health()
    assert [h["name"] for h in health] == ["gen0", "gen1"]
    assert all(h["alive"] and h["version"] == 2 and h["completed"] == 3 for h in health)
    assert not manager.abort(handles[0].request_id)  # finished requests are forgotten
    manager.close()


def test_remote_server_keeps_the_submit_contract(model):
    """The process-backed twin: float ids are refused before they cross the pipe (never
    truncated by the client), and the child's refusals come back as the same failed handles."""
    from jaxrlhf.system.remote_server import RemoteGenerationServer

    server = RemoteGenerationServer(
        CFG, model.params, max_slots=SLOTS, max_seq_len=SEQ_LEN, decode_chunk=CHUNK
    )
    try:
        floats = server.submit([1, 2.9], SamplingParams(max_new_tokens=2))
        assert floats.done()
        with pytest.raises(InvalidRequestError, match=r"got 2\.9 at position 1"):
            floats.result()
        seed = server.submit([1, 2], SamplingParams(max_new_tokens=2, seed=2**70))
        with pytest.raises(InvalidRequestError, match="seed=1180591620717411303424 is invalid"):
            seed.result(timeout=120)
        good = server.submit(np.array([1, 2], np.int32), SamplingParams(max_new_tokens=2))
        assert len(good.result(timeout=120).completions[0].tokens) == 2
    finally:
        server.close()
