"""Every user-caused failure is one line and exit code 2, never a traceback: bad model paths and
hub names (offline too, without waiting), broken model directories (empty, config.json missing,
invalid or of an unsupported family, truncated or mismatched weights), corrupt data files, a
reward that cannot be loaded and a config path that is a directory. Each launcher case fails
before anything compiles; no test touches the network (the hub is made unreachable on
localhost)."""

import gzip
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf.data.pipeline import load_tokenizer
from jaxrlhf.data.tokenizer import build_char_tokenizer
from jaxrlhf.errors import USER_ERRORS, ConfigError, DataError
from jaxrlhf.models import hf_io, init_model, save_pretrained
from jaxrlhf.models.config import ModelConfigError, TransformerConfig
from jaxrlhf.models.safetensors_io import CheckpointError, SafetensorsReader
from jaxrlhf.models.sharding import MeshError, make_mesh
from jaxrlhf.rewards.base import REWARDS, RewardLoadError
from jaxrlhf.system.rollout import Trajectories
from jaxrlhf.system.scoring import Scorer

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy_ppo.yaml")
TINY = TransformerConfig(
    vocab_size=80, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
    num_kv_heads=1, tie_word_embeddings=True, qkv_bias=True,  # qwen2 has q/k/v biases
)  # fmt: skip
ROWS = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(300)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny HF checkpoint with the character tokenizer, as `save_pretrained` writes it."""
    path = tmp_path_factory.mktemp("hf") / "tiny"
    save_pretrained(init_model(TINY), str(path), tokenizer=build_char_tokenizer())
    return path


def _copy(model_dir: Path, tmp: Path) -> Path:
    out = tmp / "model"
    shutil.copytree(model_dir, out)
    return out


def _edit_config(d: Path, **changes) -> None:
    hf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(hf | changes))


def _closed_port() -> int:
    """A localhost port nothing listens on (connecting is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Each case: (name, build(model_dir, tmp) -> extra launcher args, environment changes,
# substrings the one line must hold).
def _missing(m, tmp):
    return [f"actor.path={tmp / 'no' / 'such' / 'model'}"]


def _empty(m, tmp):
    (tmp / "empty").mkdir()
    return [f"actor.path={tmp / 'empty'}"]


def _offline_name(m, tmp):
    return ["actor.path=acme/tiny-model"]


def _no_config(m, tmp):
    d = _copy(m, tmp)
    (d / "config.json").unlink()
    return [f"actor.path={d}"]


def _bad_json(m, tmp):
    d = _copy(m, tmp)
    (d / "config.json").write_text('{"model_type": "qwen2",\n  "vocab_size": 80,,\n}')
    return [f"actor.path={d}"]


def _gpt2(m, tmp):
    d = _copy(m, tmp)
    gpt2 = {"model_type": "gpt2", "vocab_size": 80, "n_embd": 32, "n_layer": 1, "n_head": 2,
            "bos_token_id": 2, "eos_token_id": 1}  # fmt: skip
    (d / "config.json").write_text(json.dumps(gpt2))
    return [f"actor.path={d}"]


def _truncated(m, tmp):
    d = _copy(m, tmp)
    weights = d / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 4000)
    return [f"actor.path={d}"]


def _mismatched(m, tmp):
    d = _copy(m, tmp)
    _edit_config(d, hidden_size=48)  # head_dim stays 16: q/k/v/o and the MLP disagree
    return [f"actor.path={d}"]


def _no_weights(m, tmp):
    d = _copy(m, tmp)
    (d / "model.safetensors").unlink()
    return [f"actor.path={d}"]


def _corrupt_parquet(m, tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp / "good.parquet")
    blob = (tmp / "good.parquet").read_bytes()
    (tmp / "bad.parquet").write_bytes(blob[: len(blob) // 2])
    return [f"data.train_path={tmp / 'bad.parquet'}"]


def _truncated_gz(m, tmp):
    blob = gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode())
    (tmp / "rows.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    return [f"data.train_path={tmp / 'rows.jsonl.gz'}"]


def _hub_dataset(m, tmp):
    return ["data.train_path=hf:acme/prompts?split=train"]


def _reward_module(m, tmp):
    return ["reward.fn=no_such_reward_module:score"]


def _config_dir(m, tmp):
    return ["--config", str(tmp)]


OFFLINE = {"HF_HUB_OFFLINE": "1"}
CASES = [
    ("missing path", _missing, OFFLINE, ["actor.path", "no/such/model", "does not exist"]),
    ("empty dir", _empty, OFFLINE, ["actor.path", "empty is an empty directory"]),
    ("name, offline", _offline_name, OFFLINE,
     ["actor.path", "'acme/tiny-model'", "not in the HF cache", "HF_HUB_OFFLINE is set"]),
    ("name, hub unreachable", _offline_name, {"HF_ENDPOINT": "http://127.0.0.1:{port}"},
     ["actor.path", "'acme/tiny-model'", "http://127.0.0.1:", "cannot be reached"]),
    ("no config.json", _no_config, OFFLINE,
     ["actor.path: ", "model/config.json does not exist"]),
    ("invalid config.json", _bad_json, OFFLINE,
     ["actor.path: ", "model/config.json, line 2: invalid JSON"]),
    ("model_type gpt2", _gpt2, OFFLINE,
     ["actor.path: ", "config.json: unsupported model_type 'gpt2'",
      "expected one of llama, qwen2, qwen3, mistral"]),
    ("truncated weights", _truncated, OFFLINE,
     ["actor.path: ", "model/model.safetensors is truncated", "tensor 'model.", "re-download"]),
    ("weights vs config.json", _mismatched, OFFLINE,
     ["actor.path: ", "model/model.safetensors: tensor 'model.embed_tokens.weight'",
      "has shape (80, 32)", "model/config.json implies (80, 48)"]),
    ("no weights", _no_weights, OFFLINE,
     ["actor.path: ", "model has neither model.safetensors"]),
    ("corrupt parquet", _corrupt_parquet, OFFLINE,
     ["bad.parquet is not a readable Parquet file", "ArrowInvalid"]),
    ("truncated jsonl.gz", _truncated_gz, OFFLINE,
     ["rows.jsonl.gz is truncated or corrupt: reading failed after line ", "EOFError"]),
    ("hub dataset, hub unreachable", _hub_dataset, {"HF_ENDPOINT": "http://127.0.0.1:{port}"},
     ["'hf:acme/prompts?split=train'", "the hub http://127.0.0.1:", "cannot be reached",
      "HF_HUB_OFFLINE=1"]),
    ("reward module", _reward_module, OFFLINE,
     ["reward.fn", "'no_such_reward_module'", "No module named"]),
    ("config is a directory", _config_dir, OFFLINE, ["is a directory; expected a YAML file"]),
]  # fmt: skip


@pytest.mark.parametrize("build, env, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_launcher_user_errors_are_one_line(model_dir, tmp_path, build, env, expected):
    """Exit code 2 and exactly one line on stderr naming the file / key / value."""
    args = build(model_dir, tmp_path)
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    child_env = {k: v for k, v in os.environ.items() if k not in offline}
    child_env |= {k: v.format(port=_closed_port()) for k, v in env.items()}
    child_env |= {"HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(ROOT)}
    config = [] if args[0] == "--config" else ["--config", TOY]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "ppo.py"), *config, *args,
         f"experiment.output_dir={tmp_path / 'run'}", "logging.progress=false"],
        capture_output=True, text=True, cwd=tmp_path, env=child_env, timeout=300,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert time.monotonic() - started < 120  # the offline cases do not wait for the network


# ----------------------------------------------------------------------------- in process


def test_user_error_classes_are_ground_floor_errors():
    """Each layer's user errors are ConfigError / DataError, so main_guard and
    distributed.guarded print them as one line."""
    for cls, base in [(MeshError, ConfigError), (ModelConfigError, ConfigError),
                      (RewardLoadError, ConfigError), (CheckpointError, DataError)]:  # fmt: skip
        assert issubclass(cls, base) and issubclass(cls, USER_ERRORS)
    with pytest.raises(MeshError, match=r"mesh\.fsdp=0 is invalid"):
        make_mesh(data=-1, fsdp=0)


def test_hub_name_resolves_from_the_cache_offline(model_dir, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE with the model in the HF cache: the snapshot is loaded, bit-equal to the
    directory it was copied from; a name not in the cache is one sentence."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_io, "_probe", lambda endpoint: pytest.fail("probed the hub offline"))

    loaded = hf_io.from_pretrained("acme/tiny", key="actor.path")
    reference = hf_io.from_pretrained(str(model_dir))
    for path in (("embed",), ("layers", "q"), ("layers", "down")):
        a, b = loaded.params, reference.params
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(load_tokenizer("acme/tiny", key="actor.path")) == len(build_char_tokenizer())
    with pytest.raises(ConfigError, match=r"actor\.path: 'acme/other' is not a local directory"):
        hf_io.resolve_model_dir("acme/other", "actor.path")

    # Online but the hub unreachable: the cache still serves; online and reachable, a download
    # that fails (not found, gated) is one sentence.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_io, "_probe", lambda endpoint: "cannot be reached (refused)")
    snapshot = repo / "snapshots" / commit
    assert Path(hf_io.resolve_model_dir("acme/tiny", "actor.path")) == snapshot
    monkeypatch.setattr(hf_io, "_probe", lambda endpoint: None)

    def not_found(name):
        raise OSError(f"404 Client Error. Repository Not Found for url: .../{name}.\nmore")

    monkeypatch.setattr(hf_io, "_download", not_found)
    with pytest.raises(ConfigError, match=r"ref\.path: 'acme/gone' is not a local directory, and "
                       r"downloading it from the hub failed \(404 Client Error\. Repository Not "
                       r"Found for url: \.\.\./acme/gone\.\)\.$"):  # fmt: skip
        hf_io.resolve_model_dir("acme/gone", "ref.path")


def test_hub_probe_gives_up_quickly(monkeypatch):
    """A hub whose name or connection hangs is given HUB_PROBE_TIMEOUT_S, not a minute."""
    monkeypatch.setattr(hf_io, "HUB_PROBE_TIMEOUT_S", 0.2)

    def hang(*args, **kwargs):  # a connection attempt that hangs, then times out
        time.sleep(5)
        raise TimeoutError("timed out")

    monkeypatch.setattr(hf_io.socket, "create_connection", hang)
    started = time.monotonic()
    assert hf_io._probe("https://hub.invalid") == "did not answer within 0.2 s"
    assert time.monotonic() - started < 2.0


def test_model_directory_errors_in_process(model_dir, tmp_path):
    """A file instead of a directory, a directory without tokenizer files, and a safetensors
    header entry whose byte span does not fit its shape: each names the file and the key."""
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"critic\.path: .*weights\.bin is a file"):
        hf_io.resolve_model_dir(str(tmp_path / "weights.bin"), "critic.path")

    only_weights = tmp_path / "only_weights"
    only_weights.mkdir()
    shutil.copy(model_dir / "config.json", only_weights)
    with pytest.raises(ConfigError, match=r"data\.tokenizer: .*only_weights has no tokenizer"):
        load_tokenizer(str(only_weights))

    bad = _copy(model_dir, tmp_path)
    blob = (bad / "model.safetensors").read_bytes()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    name = "model.embed_tokens.weight"
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end - 4]  # 4 bytes short of [80, 32] float32
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    assert len(text) == size
    (bad / "model.safetensors").write_bytes(blob[:8] + text + blob[8 + size :])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' spans"):
        SafetensorsReader(str(bad))
    (bad / "model.safetensors").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)  # a zip
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a safetensors file"):
        SafetensorsReader(str(bad))


@REWARDS.register("test_user_errors_picky")
def _picky(response: str, answer: str):
    """None for response "none", a string for "str", raises for "raise", else 1."""
    if response == "raise":
        raise RuntimeError(f"cannot score {response!r}")
    return {"none": None, "str": "0.5"}.get(response, 1.0)


def test_scorer_names_the_failed_sample(tmp_path, caplog):
    """A reward returning None / a string or raising scores 0 and is counted; the logged first
    failure names the sample, its prompt and its response index (the run goes on)."""
    from toy import toy_config

    scorer = Scorer(toy_config(tmp_path, "reward.fn=test_user_errors_picky"))
    responses = ["ok", "ok", "ok", "none", "str", "raise"]
    prompts = ["1+1=", "1+1=", "2+2=", "2+2=", "3+3=", "3+3="]
    traj = Trajectories(
        input_ids=[], response_mask=[], behav_logprobs=[], versions=[],
        prompt_lens=np.zeros(0), response_lens=np.zeros(0), truncated=np.zeros(0),
        prompts=prompts, responses=responses, answers=["2"] * 6, metadata=[None] * 6,
        group_size=2,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="jaxrlhf.system.scoring"):
        scores, counts = scorer.score(traj)
    np.testing.assert_array_equal(scores, [1, 1, 1, 0, 0, 0])
    assert counts == {"reward/errors": 3.0, "reward/timeouts": 0.0}
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "jaxrlhf.system.scoring"]
    assert "sample 3 (prompt 1, response 1; prompt '2+2='): TypeError" in warning
    assert "returned NoneType, expected a float" in warning
