"""Generation tokens/s: jaxrlhf vs transformers' PyTorch `generate` (and Tunix), same weights.

CPU preset (default): the Qwen2-shaped bench model (4 layers, hidden 512, intermediate 1408,
8 heads, 2 kv heads, head_dim 64, vocab 32768, tied, float32), batch 8 and 32, prompt 64,
exactly 128 new tokens, greedy. GPU preset (``--preset gpu``): Qwen2.5-0.5B-shaped, bfloat16,
batch 64 and 1, prompt 256, 512 new tokens.

Reported per engine: end-to-end tokens/s (prefill included) and decode tokens/s
(``B * (new - 1) / (t(new) - t(1))``, prefill excluded), compile time separately (first calls
minus warm calls). Engines are timed interleaved, best of ``--iters``, so that load spikes hit
all alike. On CPU transformers runs with 1 and with all intra-op threads and the better is kept
(its OpenMP teams collapse when other processes hold the cores). The hardware's memory bandwidth
and matmul rate are measured in the same run; a decode step's roofline is max(bytes / bandwidth,
FLOPs / matmul rate) with bytes = weights + the mean KV cache read. Then a long-tail workload
(heavy-tailed response lengths): the server's continuous batching vs static batches of the same
size, same compiled steps.

Tunix's sampler runs in a subprocess with ``--tunix-path DIR`` prepended to ``PYTHONPATH`` (e.g.
``pip install --target DIR --no-deps google-tunix google-metrax perfetto clu tensorboardX wrapt
jaxtyping wadler-lindig sentencepiece``); when it cannot run, the JSON says why.

    python benchmarks/generate.py [--preset cpu|gpu] [--tunix-path DIR] [--iters 3]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxrlhf.generation import GenerationServer, SamplingParams, generate
from jaxrlhf.models import from_pretrained

PRESETS = {
    "cpu": dict(
        model=dict(
            vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        ),
        dtype="float32", batches=(8, 32), prompt=64, new=128, long_tail=True,
    ),
    "gpu": dict(
        model=dict(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, head_dim=64, rope_theta=1e6,
        ),
        dtype="bfloat16", batches=(64, 1), prompt=256, new=512, long_tail=False,
    ),
}  # fmt: skip
HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- hardware


def _best(fn, iters: int) -> float:
    fn()
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_hardware(platform: str) -> dict:
    """Memory bandwidth (read, or device copy on GPU) and dense matmul rate in the model dtype."""
    if platform == "cpu":
        x = jnp.ones((64 << 20,), jnp.float32)  # 256 MB, far beyond the caches
        read = jax.jit(jnp.sum)
        bw = x.nbytes / _best(lambda: read(x).block_until_ready(), 5)
        n, dtype = 2048, jnp.float32
    else:
        x = jnp.ones((256 << 20,), jnp.float32)  # 1 GB
        copy = jax.jit(lambda a: a + 1)
        bw = 2 * x.nbytes / _best(lambda: copy(x).block_until_ready(), 10)
        n, dtype = 8192, jnp.bfloat16
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a: a @ a)
    rate = 2 * n**3 / _best(lambda: mm(a).block_until_ready(), 5)
    return {"bandwidth_gb_s": bw / 1e9, "matmul_gflop_s": rate / 1e9}


def roofline(hf: dict, batch: int, prompt: int, new: int, dtype: str, hw: dict) -> dict:
    """Lower bound of one decode step's time and the tokens/s it allows."""
    V, D, F = hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"]
    L, H, K, E = (hf[k] for k in ("num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "head_dim"))  # fmt: skip
    layer = D * (H + 2 * K) * E + H * E * D + 3 * D * F
    matmul_params = L * layer + V * D  # lm head (tied: the embedding)
    size = np.dtype(jnp.dtype(dtype)).itemsize
    mean_len = prompt + new / 2
    kv_bytes = L * 2 * batch * K * mean_len * E * size
    step_bytes = matmul_params * size + kv_bytes
    step_flops = 2 * batch * matmul_params + 4 * batch * L * H * E * mean_len
    floor = max(
        step_bytes / (hw["bandwidth_gb_s"] * 1e9), step_flops / (hw["matmul_gflop_s"] * 1e9)
    )
    return {"step_bytes": step_bytes, "step_flops": step_flops, "tokens_per_s": batch / floor}


# --------------------------------------------------------------------------- engines


class JaxEngine:
    name = "jaxrlhf"

    def __init__(self, model, ids: np.ndarray):
        self.model, self.ids = model, ids

    def run(self, new: int) -> float:
        start = time.perf_counter()
        out = generate(self.model, self.ids, max_new_tokens=new)  # returns host arrays
        seconds = time.perf_counter() - start
        assert out.lengths.min() == new, "forced full length failed"
        return seconds


class TorchEngine:
    """HF `generate`; on CPU with a fixed intra-op thread count (OpenMP teams collapse when other
    processes hold the cores, so the caller times 1 and all threads and keeps the better)."""

    def __init__(self, hf_model, ids: np.ndarray, device: str, threads: int | None = None):
        self.model, self.device, self.threads = hf_model, device, threads
        self.ids = torch.tensor(ids, device=device)
        self.name = "transformers" if threads is None else f"transformers_{threads}t"

    def run(self, new: int) -> float:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=new,
                min_new_tokens=new, do_sample=False, pad_token_id=0,
            )  # fmt: skip
        if self.device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == self.ids.shape[1] + new
        return time.perf_counter() - start


class TunixEngine:
    """`_tunix_peer.py` in a subprocess with Tunix on its ``PYTHONPATH``; timed on request."""

    name = "tunix"

    def __init__(self, path: str | None, model_dir: str, batch: int, prompt: int, new: int,
                 dtype: str):  # fmt: skip
        env = dict(os.environ)
        if path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))
        cmd = [sys.executable, os.path.join(HERE, "_tunix_peer.py"), "--model-dir", model_dir,
               "--batch", str(batch), "--prompt", str(prompt), "--new", str(new),
               "--dtype", dtype]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        ready = self._read()
        self.compile_s = ready["compile_s"]
        self.version = ready.get("tunix_version")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            lines = self.proc.stderr.read().strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"exit code {self.proc.returncode}")
        return json.loads(line)

    def run(self, new: int) -> float:
        self.proc.stdin.write(f"{new}\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def measure(engines: list, batch: int, new: int, iters: int) -> dict:
    """Best-of-``iters`` times of every engine, interleaved so that load spikes hit all alike."""
    best = {(e.name, n): float("inf") for e in engines for n in (new, 1)}
    for _ in range(iters):
        for engine in engines:
            for n in (new, 1):
                best[engine.name, n] = min(best[engine.name, n], engine.run(n))
    out = {}
    for engine in engines:
        full, one = best[engine.name, new], best[engine.name, 1]
        out[engine.name] = {
            "tokens_per_s": batch * new / full,
            "decode_tokens_per_s": batch * (new - 1) / max(full - one, 1e-9),
            "generate_s": full,
            "generate_1_token_s": one,
        }
    return out


def compile_time(engine, new: int) -> float:
    """First calls (compiling) minus warm calls, for the two shapes `measure` uses."""
    first = engine.run(new) + engine.run(1)
    return first - engine.run(new) - engine.run(1)


# --------------------------------------------------------------------------- long tail


def long_tail(model, prompt: int, slots: int, count: int, seed: int = 0) -> dict:
    """Heavy-tailed response lengths (Pareto, alpha 1.2): continuous vs static batching."""
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    prompts = [rng.integers(1, vocab, prompt).tolist() for _ in range(count)]
    lengths = np.minimum(8 + (16 * rng.pareto(1.2, count)).astype(int), 256).tolist()
    server = GenerationServer(
        model, max_slots=slots, max_seq_len=prompt + 256, decode_chunk=16, threaded=False
    )
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]

    def continuous() -> None:
        for p, sp in zip(prompts, params, strict=True):
            server.submit(p, sp)
        server.run_until_idle()

    def static() -> None:
        for i in range(0, count, slots):
            for p, sp in zip(prompts[i : i + slots], params[i : i + slots], strict=True):
                server.submit(p, sp)
            server.run_until_idle()  # the next batch waits for this batch's longest response

    result = {"requests": count, "slots": slots, "prompt": prompt, "tokens": int(sum(lengths)),
              "max_len": int(max(lengths)), "mean_len": float(np.mean(lengths))}  # fmt: skip
    for name, fn in (("continuous", continuous), ("static", static)):
        seconds = _best(fn, 1)  # first pass compiles the prefill buckets it meets
        result[f"{name}_tokens_per_s"] = sum(lengths) / seconds
    result["continuous_over_static"] = (
        result["continuous_tokens_per_s"] / result["static_tokens_per_s"]
    )
    server.close()
    return result


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--batches", type=lambda s: tuple(int(x) for x in s.split(",")))
    ap.add_argument("--iters", type=int, default=3, help="timed rounds (best is kept)")
    ap.add_argument("--tunix-path", default=None, help="dir prepended to PYTHONPATH for Tunix")
    ap.add_argument("--no-tunix", action="store_true")
    ap.add_argument("--no-long-tail", action="store_true")
    ap.add_argument("--prompt", type=int, help="override the preset's prompt length")
    ap.add_argument("--new", type=int, help="override the preset's new tokens")
    ap.add_argument("--layers", type=int, help="override the preset's layer count (smoke tests)")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    if args.layers:
        preset = preset | {"model": preset["model"] | {"num_hidden_layers": args.layers}}
    batches = args.batches or preset["batches"]
    prompt, new = args.prompt or preset["prompt"], args.new or preset["new"]
    dtype = preset["dtype"]
    platform = jax.devices()[0].platform
    device = "cuda" if platform == "gpu" else "cpu"
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    load_start = os.getloadavg()
    hw = measure_hardware(platform)
    print(
        f"hardware: {hw['bandwidth_gb_s']:.1f} GB/s, {hw['matmul_gflop_s']:.0f} GFLOP/s", flush=True
    )
    hf_cfg = transformers.Qwen2Config(
        **preset["model"], tie_word_embeddings=True, max_position_embeddings=4096
    )
    hf_cfg.eos_token_id = None  # forced full length
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    hf_model = hf_model.to(getattr(torch, dtype)).to(device).eval()
    hf_model.generation_config.eos_token_id = None
    results: dict = {"benchmark": "generate", "preset": args.preset, "platform": platform,
                     "model": preset["model"] | {"dtype": dtype, "tied": True}, "prompt": prompt,
                     "new_tokens": new, "hardware": hw, "jax_version": jax.__version__,
                     "torch_version": torch.__version__, "batches": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as model_dir:
        hf_model.save_pretrained(model_dir)
        model = from_pretrained(model_dir, dtype=dtype)
        for batch in batches:
            ids = np.random.default_rng(batch).integers(1, hf_cfg.vocab_size - 1, (batch, prompt))
            ours = JaxEngine(model, ids)
            torch_engines = [TorchEngine(hf_model, ids, device)]
            if device == "cpu":
                cores = os.cpu_count() or 1
                torch_engines = [TorchEngine(hf_model, ids, device, t) for t in {1, cores}]
            engines = [ours, *torch_engines]
            compile_s = compile_time(ours, new)
            for engine in torch_engines:
                compile_time(engine, new)  # warm-up
            tunix: dict = {"status": "skipped", "reason": "--no-tunix"}
            if not args.no_tunix:
                try:
                    engines.append(TunixEngine(args.tunix_path, model_dir, batch, prompt, new,
                                               dtype))  # fmt: skip
                    tunix = {"status": "ok", "compile_s": engines[-1].compile_s,
                             "version": engines[-1].version}  # fmt: skip
                except Exception as e:  # report why the peer could not run
                    hint = " (install Tunix with pip --target DIR; pass --tunix-path DIR)"
                    tunix = {"status": "failed", "reason": f"{type(e).__name__}: {e}{hint}"}
            timed = measure(engines, batch, new, args.iters)
            for engine in engines[1 + len(torch_engines) :]:
                engine.close()
            jx = timed["jaxrlhf"] | {"compile_s": compile_s}
            pt = max(
                (timed[e.name] | {"threads": e.threads} for e in torch_engines),
                key=lambda r: r["decode_tokens_per_s"],
            )
            row = {"jaxrlhf": jx, "transformers": pt, "tunix": tunix | timed.get("tunix", {})}
            roof = roofline(hf_cfg.to_dict(), batch, prompt, new, dtype, hw)
            row["roofline"] = roof
            row["jaxrlhf_roofline_fraction"] = jx["decode_tokens_per_s"] / roof["tokens_per_s"]
            row["decode_speedup_vs_transformers"] = (
                jx["decode_tokens_per_s"] / pt["decode_tokens_per_s"]
            )
            row["speedup_vs_transformers"] = jx["tokens_per_s"] / pt["tokens_per_s"]
            if row["tunix"].get("status") == "ok":
                row["decode_speedup_vs_tunix"] = (
                    jx["decode_tokens_per_s"] / row["tunix"]["decode_tokens_per_s"]
                )
                row["speedup_vs_tunix"] = jx["tokens_per_s"] / row["tunix"]["tokens_per_s"]
            if platform == "gpu":
                step_s = batch / jx["decode_tokens_per_s"]
                achieved = roof["step_bytes"] / step_s / 1e9
                row["achieved_bandwidth_fraction"] = achieved / hw["bandwidth_gb_s"]
            results["batches"][str(batch)] = row
            _print_row(batch, row)
        if preset["long_tail"] and not args.no_long_tail:
            results["long_tail"] = long_tail(model, prompt=prompt, slots=16, count=48)
            lt = results["long_tail"]
            print(f"long tail: continuous {lt['continuous_tokens_per_s']:.0f} tok/s, "
                  f"static {lt['static_tokens_per_s']:.0f} tok/s "
                  f"({lt['continuous_over_static']:.2f}x)")  # fmt: skip
    results["load_average_start_end"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(results))


def _print_row(batch: int, row: dict) -> None:
    print(json.dumps({"batch": batch} | row), flush=True)  # partial results survive a timeout
    tunix = row["tunix"]
    print(f"batch {batch}:")
    for name in ("jaxrlhf", "transformers", "tunix"):
        r = row[name]
        if r.get("status", "ok") != "ok":
            print(f"  {name:12s} {r['status']}: {r['reason']}")
            continue
        extra = f"  compile {r['compile_s']:.1f}s" if "compile_s" in r else ""
        print(f"  {name:12s} decode {r['decode_tokens_per_s']:9.0f} tok/s   "
              f"end-to-end {r['tokens_per_s']:9.0f} tok/s{extra}")  # fmt: skip
    print(f"  roofline {row['roofline']['tokens_per_s']:.0f} tok/s; jaxrlhf at "
          f"{row['jaxrlhf_roofline_fraction']:.0%}; vs transformers "
          f"{row['decode_speedup_vs_transformers']:.2f}x decode")  # fmt: skip
    if tunix.get("status") == "ok":
        print(f"  vs tunix {row['decode_speedup_vs_tunix']:.2f}x decode")


if __name__ == "__main__":
    main()
