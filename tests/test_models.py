"""Model correctness against transformers' PyTorch implementations (the independent reference)."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from jaxrlhf.models import (
    CheckpointError,
    ModelConfigError,
    TransformerConfig,
    from_pretrained,
    hidden_states,
    init_model,
    lm_logits,
    make_mesh,
    save_pretrained,
)

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

# name -> (HF config class, kwargs): every family, tied and untied, MQA and GQA, rope scalings.
FAMILIES = {
    "llama_gqa_llama3": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
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
    "llama_mqa_linear_tied_bias": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
    "qwen2_gqa_tied": (
        transformers.Qwen2Config,
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    ),
    "qwen2_sliding_layers": (
        transformers.Qwen2Config,
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
    ),
    "qwen3_gqa_untied": (
        transformers.Qwen3Config,
        dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False),
    ),
    "mistral_gqa_window": (
        transformers.MistralConfig,
        dict(num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False),
    ),
}


def _perturbed_hf_model(cls, kwargs, seed=0):
    """A random HF model whose norms and biases are not at their init values (1 and 0)."""
    torch.manual_seed(seed)
    config = cls(**BASE, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def _hf_row_logits(model, ids):
    """HF logits of one unpadded row."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _left_padded(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    return [rng.integers(1, BASE["vocab_size"], n).tolist() for n in (12, 7, 10, 3)]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_dir(request, tmp_path_factory):
    cls, kwargs = FAMILIES[request.param]
    model = _perturbed_hf_model(cls, kwargs)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return model, path


def _assert_rows_match(logits, mask, rows, reference_model, atol=1e-4):
    logits = np.asarray(logits)
    for i, r in enumerate(rows):
        expected = _hf_row_logits(reference_model, r)
        got = logits[i][mask[i] == 1]
        np.testing.assert_allclose(got, expected, atol=atol, rtol=0)


def test_hf_parity_left_padded(hf_dir, rows):
    """HF save -> from_pretrained -> logits equal HF's on each row run alone (<= 1e-4)."""
    model, path = hf_dir
    handle = from_pretrained(path, dtype="float32")
    ids, mask = _left_padded(rows)
    _assert_rows_match(handle.logits(ids, mask), mask, rows, model)


def test_save_pretrained_loads_in_transformers(hf_dir, rows, tmp_path):
    """Our export loads in transformers and gives the same logits."""
    model, path = hf_dir
    handle = from_pretrained(path)
    out = str(tmp_path / "export")
    save_pretrained(handle, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids, mask = _left_padded(rows)
    _assert_rows_match(handle.logits(ids, mask), mask, rows, reloaded.eval())
    # and the original and reloaded HF models agree with each other too
    for r in rows[:2]:
        np.testing.assert_allclose(
            _hf_row_logits(reloaded, r), _hf_row_logits(model, r), atol=1e-6, rtol=0
        )


def test_from_scratch_round_trip(tmp_path, rows):
    """A model we initialise, exported, equals transformers' forward of the export."""
    cfg = TransformerConfig(
        model_type="qwen3", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=1, qk_norm=True, tie_word_embeddings=True,
    )  # fmt: skip
    handle = init_model(cfg, seed=3)
    save_pretrained(handle, str(tmp_path / "m"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "m"), attn_implementation="eager"
    ).eval()
    ids, mask = _left_padded(rows)
    _assert_rows_match(handle.logits(ids, mask), mask, rows, reloaded)
    again = from_pretrained(str(tmp_path / "m"))
    np.testing.assert_array_equal(
        np.asarray(again.logits(ids, mask)), np.asarray(handle.logits(ids, mask))
    )


def test_sharded_checkpoint_and_index(tmp_path, rows):
    """Sharded safetensors with an index, written by transformers and by us."""
    cls, kwargs = FAMILIES["qwen2_gqa_tied"]
    model = _perturbed_hf_model(cls, kwargs, seed=1)
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
    handle = from_pretrained(str(tmp_path / "hf"))
    ids, mask = _left_padded(rows)
    _assert_rows_match(handle.logits(ids, mask), mask, rows, model)
    save_pretrained(handle, str(tmp_path / "ours"), max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "ours"), attn_implementation="eager"
    ).eval()
    _assert_rows_match(handle.logits(ids, mask), mask, rows, reloaded)


def test_transformers5_rope_parameters_config(tmp_path, hf_dir):
    """config.json in the 5.x layout (rope_parameters) and the 4.x layout give the same model."""
    _, path = hf_dir
    hf = json.loads(Path(path, "config.json").read_text())
    handle = from_pretrained(path)
    other = dict(hf)
    if "rope_parameters" in other:  # 5.x file -> write the 4.x layout
        params = other.pop("rope_parameters")
        other["rope_theta"] = params["rope_theta"]
        other["rope_scaling"] = None if params["rope_type"] == "default" else dict(params)
    else:  # 4.x file -> write the 5.x layout
        scaling = other.pop("rope_scaling", None) or {"rope_type": "default"}
        other["rope_parameters"] = dict(scaling) | {"rope_theta": other.pop("rope_theta")}
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps(other))
    os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "other" / "model.safetensors")
    assert from_pretrained(str(tmp_path / "other")).config == handle.config


def test_packed_sequences_equal_separate(rows):
    """Two sequences packed in one row (segment ids + positions) equal each run alone."""
    cfg = TransformerConfig(model_type="llama", vocab_size=97, num_kv_heads=2)
    handle = init_model(cfg, seed=1)
    a, b = rows[0], rows[1]
    packed = np.asarray([a + b + [0, 0]], np.int32)
    positions = np.asarray([list(range(len(a))) + list(range(len(b))) + [0, 0]], np.int32)
    segments = np.asarray([[1] * len(a) + [2] * len(b) + [0, 0]], np.int32)
    fn = jax.jit(lambda p, i, pos, s: lm_logits(p, cfg, hidden_states(p, cfg, i, pos, s)))
    packed_logits = np.asarray(fn(handle.params, packed, positions, segments))[0]
    np.testing.assert_allclose(
        packed_logits[: len(a)], np.asarray(handle.logits([a]))[0], atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(
        packed_logits[len(a) : len(a) + len(b)],
        np.asarray(handle.logits([b]))[0],
        atol=1e-5,
        rtol=0,
    )


def test_sharded_forward_matches_single_device(rows):
    """fsdp=2 x tensor=2 on 4 CPU devices equals the single-device forward (<= 1e-5)."""
    assert jax.device_count() >= 4
    cfg = TransformerConfig(model_type="qwen2", vocab_size=96, num_heads=4, num_kv_heads=2,
                            qkv_bias=True)  # fmt: skip
    single = init_model(cfg, seed=2)
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    sharded = init_model(cfg, seed=2, mesh=mesh)
    assert sharded.params["layers"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    ids, mask = _left_padded(rows)
    out = sharded.logits(ids, mask)
    assert len(out.sharding.device_set) == 4
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(single.logits(ids, mask)), atol=1e-5, rtol=0
    )


def test_sharded_load_streams_into_shards(hf_dir, rows):
    model, path = hf_dir
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    handle = from_pretrained(path, mesh=mesh)
    assert len(handle.params["layers"]["gate"].sharding.device_set) == 4
    ids, mask = _left_padded(rows)
    _assert_rows_match(handle.logits(ids, mask), mask, rows, model)


def test_bfloat16_params_and_remat_gradients(hf_dir, rows):
    """bf16 loading is close to f32; remat gives the same gradients as no remat."""
    _, path = hf_dir
    f32 = from_pretrained(path)
    bf16 = from_pretrained(path, dtype="bfloat16")
    assert bf16.params["embed"].dtype == jnp.bfloat16
    ids, mask = _left_padded(rows)
    diff = np.abs(np.asarray(bf16.logits(ids, mask)) - np.asarray(f32.logits(ids, mask)))
    assert diff[mask == 1].max() < 0.1

    def loss(params, cfg):
        from jaxrlhf.models import forward_logits

        return jnp.mean(forward_logits(params, cfg, jnp.asarray(ids), jnp.asarray(mask)) ** 2)

    g = jax.grad(loss)(f32.params, f32.config)
    g_remat = jax.grad(loss)(f32.params, f32.config.replace(remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g, g_remat)


def test_unsupported_model_type_and_missing_tensor(tmp_path, hf_dir):
    _, path = hf_dir
    hf = json.loads(Path(path, "config.json").read_text())
    bad = tmp_path / "bad"
    os.makedirs(bad)
    (bad / "config.json").write_text(json.dumps(hf | {"model_type": "gpt_neox"}))
    with pytest.raises(ModelConfigError, match="unsupported model_type 'gpt_neox'"):
        from_pretrained(str(bad))

    # Drop one tensor from a copy of the checkpoint.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    missing = tmp_path / "missing"
    os.makedirs(missing)
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    (missing / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        from_pretrained(str(missing))


def test_mesh_errors():
    with pytest.raises(ValueError, match="must multiply to the device count"):
        make_mesh(data=1, fsdp=3, tensor=1, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="at most one may be -1"):
        make_mesh(data=-1, fsdp=-1)
    assert dict(make_mesh(data=-1, tensor=2, devices=jax.devices()[:4]).shape) == {
        "data": 2, "fsdp": 1, "tensor": 2,
    }  # fmt: skip


def test_build_model_from_experiment_config(hf_dir, tmp_path):
    """`actor.*` config builds the architecture it names; `actor.path` loads the checkpoint."""
    from jaxrlhf.config import load_config
    from jaxrlhf.models import build_model

    cfg = load_config(
        None,
        [
            "actor.model_type=llama", "actor.vocab_size=50", "actor.hidden_size=32",
            "actor.num_heads=4", "actor.num_kv_heads=1", "actor.tie_word_embeddings=false",
            "actor.rope_scaling.rope_type=llama3", "actor.rope_scaling.factor=4",
        ],
    )  # fmt: skip
    handle = build_model(cfg.actor, value_head=True)
    assert handle.config.num_kv_heads == 1 and handle.config.rope.rope_type == "llama3"
    assert handle.params["lm_head"].shape == (32, 50)
    assert handle.params["value_head"]["kernel"].shape == (32,)
    model, path = hf_dir
    loaded = build_model(load_config(None, [f"actor.path={path}"]).actor)
    ids = [[5, 6, 7]]
    np.testing.assert_allclose(
        np.asarray(loaded.logits(ids))[0], _hf_row_logits(model, ids[0]), atol=1e-4, rtol=0
    )


def test_transformer_config_copies_every_architecture_field():
    """Each architecture field of the experiment config reaches the model config unchanged."""
    from jaxrlhf.config import ModelConfig, RopeScalingConfig
    from jaxrlhf.models import RopeConfig, transformer_config

    arch = dict(
        model_type="qwen3", vocab_size=77, hidden_size=48, intermediate_size=80, num_layers=3,
        num_heads=6, num_kv_heads=3, head_dim=16, rms_norm_eps=0.001,
        max_position_embeddings=321, tie_word_embeddings=False, initializer_range=0.05,
        param_dtype="bfloat16", compute_dtype="bfloat16", remat=True,
    )  # fmt: skip
    rope = dict(
        rope_type="llama3", factor=2.0, low_freq_factor=1.5, high_freq_factor=3.0,
        original_max_position_embeddings=64,
    )  # fmt: skip
    cfg = ModelConfig(**arch, rope_theta=1234.0, rope_scaling=RopeScalingConfig(**rope))
    built = transformer_config(cfg)
    assert {name: getattr(built, name) for name in arch} == arch
    assert built.rope == RopeConfig(theta=1234.0, **rope)
    assert built.qk_norm and not built.qkv_bias
    plain = transformer_config(ModelConfig(model_type="qwen2", rope_theta=99.0))
    assert plain.rope == RopeConfig(theta=99.0) and plain.qkv_bias and not plain.qk_norm


def test_qwen2_without_qkv_bias_is_refused_at_export(tmp_path):
    """HF Qwen2 always has q/k/v biases: such an export used to be written and then failed to
    load (here and in transformers)."""
    from jaxrlhf.models.config import ModelConfigError

    cfg = TransformerConfig(
        model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, num_kv_heads=1,
    )  # fmt: skip
    out = tmp_path / "export"
    with pytest.raises(ModelConfigError, match=r"qwen2 models have q/k/v biases"):
        save_pretrained(init_model(cfg, seed=0), str(out))
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
    save_pretrained(init_model(cfg.replace(qkv_bias=True), seed=0), str(out))  # with them: fine
    assert (out / "config.json").is_file()
