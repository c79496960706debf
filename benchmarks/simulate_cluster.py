"""Discrete-event projection of synchronous vs asynchronous PPO throughput on a GPU cluster.

Cost model (per generation instance = one GPU, per train step = the train GPUs together):

* decode step with ``b`` running sequences holding ``C`` cached tokens:
  ``max((weight bytes + C * KV bytes per token) / (HBM bandwidth * eff_bw),
  2 * N * b / (peak FLOP/s * eff_decode)) + step overhead``;
* prefill / KV recompute of ``T`` tokens: ``2 * N * T / (peak * mfu)``;
* train step over ``T`` tokens on ``G_train`` GPUs: ``(6 + 2) * N * T / (G_train * peak * mfu)``
  (forward + backward, plus the proximal / old log-prob pass);
* weight update: ``weight bytes / interconnect bandwidth`` (async: generation pauses for it and
  re-prefills the in-flight contexts: interruptible generation).

Sync: all GPUs generate the batch (continuous batching per GPU, the step waits for the longest
response), then all train; the CPU projection models jaxrlhf's own sync path instead, a static
batch that decodes every row until the longest response ends. Async: ``gen_frac`` of the GPUs
generate continuously, the rest train; admission and batch selection are the *real* rules of
`jaxrlhf.system.staleness` (capacity ``(η + V + 1) * B``, every group consumed within η
versions); the best ``gen_frac`` is reported.
Response lengths: log-normal, clipped at ``--max-len`` (heavy tail, as in long-CoT math RL).

Calibration (``--calibrate``) measures on this machine the toy policy's decode-step time at two
batch sizes and its train time per token, fits the same cost form (overhead + per-row cost;
seconds per token), and projects the CPU benchmark workload (``benchmarks/async_vs_sync.py``:
one core generates, one trains, vs both cores for sync), so the model can be checked against a
measurement before it is trusted on GPUs. GPU constants (H800 / H100 SXM: 989 TFLOP/s bf16 dense,
3.35 TB/s HBM, 50 GB/s per-GPU inter-node) and efficiencies are flags.

AReaL reports up to 2.77x over synchronous RL at equal GPUs (arXiv 2505.24298, abstract and
Table 1; 1.5B-32B models, 16-512 GPUs); the projection is printed next to that figure.

    python benchmarks/simulate_cluster.py [--calibrate] [--eta 4] [--steps 12]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxrlhf.system.staleness import GroupInfo, capacity, select_batch

AREAL_MAX_SPEEDUP = 2.77
MODELS = {  # params, layers, kv heads, head dim (Qwen2.5 / R1-Distill-Qwen shapes)
    "1.5B": (1.54e9, 28, 2, 128),
    "7B": (7.6e9, 28, 4, 128),
}


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds for each kind of work (see the module docstring)."""

    step_overhead_s: float  # fixed cost of one decode step
    row_s: float  # compute cost per running row per decode step
    weight_read_s: float  # weights streamed once per decode step
    kv_token_s: float  # per cached token per decode step
    prefill_token_s: float  # per prompt / recomputed token, one instance
    train_token_s: float  # per trained token, one train device
    weight_sync_s: float

    def decode_step(self, rows: int, cached: float) -> float:
        return max(self.weight_read_s + cached * self.kv_token_s, rows * self.row_s) + (
            self.step_overhead_s
        )


def gpu_costs(model: str, a: argparse.Namespace) -> Costs:
    n, layers, kv_heads, head_dim = MODELS[model]
    kv_bytes = 2 * layers * kv_heads * head_dim * 2  # K and V, bf16
    bw, peak = a.hbm_gbs * 1e9 * a.eff_bw, a.peak_tflops * 1e12
    return Costs(
        step_overhead_s=a.step_overhead_ms / 1e3,
        row_s=2 * n / (peak * a.eff_decode),
        weight_read_s=2 * n / bw,
        kv_token_s=kv_bytes / bw,
        prefill_token_s=2 * n / (peak * a.mfu),
        train_token_s=8 * n / (peak * a.mfu),
        weight_sync_s=2 * n / (a.link_gbs * 1e9),
    )


def lengths(rng: np.random.Generator, count: int, a: argparse.Namespace) -> np.ndarray:
    x = rng.lognormal(math.log(a.median_len), a.len_sigma, count)
    return np.clip(x, 1, a.max_len).astype(np.int64)


class _Instance:
    """One generation GPU: running sequences (finish step, uid, length), a FIFO queue, and a
    clock; between events its decode rate is constant (a fluid model of continuous batching)."""

    def __init__(self, costs: Costs, slots: int, prompt: int) -> None:
        self.costs, self.slots, self.prompt = costs, slots, prompt
        self.run: list[tuple[int, int, int]] = []
        self.queue: list[tuple[int, int]] = []
        self.steps, self.t = 0, 0.0
        self.sum_start = 0  # sum of the start steps of the running sequences

    def cached(self, k: float = 0.0) -> float:
        """KV tokens held, averaged over the next ``k`` steps."""
        return len(self.run) * (self.prompt + self.steps + k / 2) - self.sum_start

    def step_s(self, k: float = 0.0) -> float:
        return self.costs.decode_step(len(self.run), self.cached(k))

    def next_finish(self) -> tuple[float, int]:
        if not self.run:
            return math.inf, 0
        k = self.run[0][0] - self.steps
        return self.t + k * self.step_s(k), k

    def advance(self, now: float) -> None:
        """Decode until ``now`` (before the next finish), so the clock reads ``now``."""
        if self.run and now > self.t:
            finish, k = self.next_finish()
            done = min(k - 1, int((now - self.t) / self.step_s(k))) if finish > now else k
            self.steps += max(done, 0)
        self.t = max(self.t, now)

    def add(self, uid: int, length: int, now: float) -> None:
        self.advance(now)
        self.queue.insert(0, (uid, length))  # FIFO: `_fill` pops from the end
        self._fill()

    def _fill(self) -> None:
        while self.queue and len(self.run) < self.slots:
            uid, length = self.queue.pop()
            self.t += self.prompt * self.costs.prefill_token_s
            self.sum_start += self.steps
            heapq.heappush(self.run, (self.steps + length, uid, length))

    def pop_finished(self, k: int, finish: float) -> list[int]:
        self.steps += k
        self.t = finish
        out = []
        while self.run and self.run[0][0] <= self.steps:
            finish, uid, length = heapq.heappop(self.run)
            self.sum_start -= finish - length
            out.append(uid)
        self._fill()
        return out

    def interrupt(self, now: float, sync_s: float) -> None:
        """New weights: pause for the transfer and re-prefill every in-flight context."""
        self.advance(now)
        self.t += sync_s + self.cached() * self.costs.prefill_token_s


def generate_on(costs: Costs, slots: int, jobs: list[int], prompt: int) -> float:
    """Continuous batching of ``jobs`` (response lengths) on one instance; seconds to finish."""
    g = _Instance(costs, slots, prompt)
    for i, length in enumerate(jobs):
        g.queue.insert(0, (i, length))
    g._fill()
    while g.run:
        finish, k = g.next_finish()
        g.pop_finished(k, finish)
    return g.t


def simulate_sync(costs: Costs, gpus: int, a: argparse.Namespace, seed: int = 0) -> float:
    """Samples/s: generate the whole batch on every GPU, then train on every GPU."""
    rng = np.random.default_rng(seed)
    total_t, samples = 0.0, 0
    n_seqs = a.batch * a.group
    for _ in range(a.steps):
        lens = lengths(rng, n_seqs, a)
        per_gpu = [[] for _ in range(gpus)]
        for i, length in enumerate(sorted(lens, reverse=True)):  # longest first, balanced
            per_gpu[i % gpus].append(int(length))
        if getattr(a, "static_batch", False):  # jaxrlhf's sync `generate`: the whole batch
            # decodes until its longest response ends (finished rows stay in the batch); KV
            # reads are left out (CPU calibration: they are in the measured per-row cost)
            gen = max(
                max(jobs) * costs.decode_step(len(jobs), 0.0)
                + len(jobs) * a.prompt_len * costs.prefill_token_s
                for jobs in per_gpu
            )
        else:
            gen = max(generate_on(costs, a.slots, jobs, a.prompt_len) for jobs in per_gpu)
        tokens = float(lens.sum() + n_seqs * a.prompt_len)
        total_t += gen + tokens * costs.train_token_s / gpus + costs.weight_sync_s
        samples += n_seqs
    return samples / total_t


def simulate_async(
    costs: Costs, gen_gpus: int, train_gpus: int, a: argparse.Namespace, seed: int = 0
) -> dict:
    """Samples/s and staleness: one event per finished sequence or train step."""
    rng = np.random.default_rng(seed)
    version, submitted, t = 0, 0, 0.0
    groups: dict[int, GroupInfo] = {}
    remaining: dict[int, int] = {}
    tokens_of: dict[int, float] = {}
    inst = [_Instance(costs, a.slots, a.prompt_len) for _ in range(gen_gpus)]
    train_end, consumed, lags, t_start = None, 0, [], 0.0

    def admit(now: float) -> None:
        nonlocal submitted
        while capacity(a.eta, version, a.batch, submitted) > 0:
            uid = submitted
            submitted += 1
            groups[uid] = GroupInfo(uid, version, False, version)
            remaining[uid] = a.group
            lens = lengths(rng, a.group, a)
            tokens_of[uid] = float(lens.sum() + a.group * a.prompt_len)
            for length in lens:  # to the least loaded instance
                g = min(inst, key=lambda s: len(s.run) + len(s.queue))
                g.add(uid, int(length), now)

    admit(0.0)
    while consumed < a.steps + a.warmup_steps:
        if train_end is None:
            chosen = select_batch(groups.values(), version, a.eta, a.batch)
            if chosen is not None:
                if consumed == a.warmup_steps:
                    t_start = t
                lags += [version - groups[u].min_version for u in chosen]
                tokens = sum(tokens_of.pop(u) for u in chosen)
                for u in chosen:
                    del groups[u]
                train_end = t + tokens * costs.train_token_s / train_gpus
        g, (finish, k) = min(((g, g.next_finish()) for g in inst), key=lambda x: x[1][0])
        if train_end is not None and train_end <= finish:
            t, train_end = train_end, None
            version += 1
            consumed += 1
            for g in inst:
                g.interrupt(t, costs.weight_sync_s)
        elif math.isfinite(finish):
            t = max(t, finish)
            for uid in g.pop_finished(k, finish):
                remaining[uid] -= 1
                if remaining[uid] == 0:
                    g0 = groups[uid]
                    groups[uid] = GroupInfo(uid, g0.submit_version, True, g0.min_version)
        else:
            raise RuntimeError("no work and no batch: the capacity rule deadlocked")
        admit(t)
    return {
        "samples_per_s": a.steps * a.batch * a.group / (t - t_start),
        "staleness_mean": float(np.mean(lags)),
        "staleness_max": int(max(lags)),
    }


def project(model: str, gpus: int, a: argparse.Namespace) -> dict:
    costs = gpu_costs(model, a)
    sync = simulate_sync(costs, gpus, a)
    best = None
    for frac in (0.5, 0.625, 0.75, 0.875):
        gen = max(1, min(gpus - 1, round(gpus * frac)))
        r = simulate_async(costs, gen, gpus - gen, a)
        if best is None or r["samples_per_s"] > best["samples_per_s"]:
            best = {**r, "gen_gpus": gen, "train_gpus": gpus - gen}
    return {"sync_samples_per_s": sync, "async": best, "ratio": best["samples_per_s"] / sync}


def calibrate(a: argparse.Namespace) -> dict:
    """Measure the toy policy here and project the CPU benchmark workload with the same model."""
    import time

    import jax

    from jaxrlhf.config import load_config
    from jaxrlhf.generation import generate
    from jaxrlhf.models import build_model

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "toy_ppo.yaml"), [])
    model = build_model(cfg.actor, seed=0)
    steps = 32
    per_step = {}
    for b in (16, 128):
        ids = np.full((b, 8), 5, np.int32)
        kw = dict(max_new_tokens=steps, min_new_tokens=steps, temperature=1.0)
        generate(model, ids, **kw)  # compile
        start = time.perf_counter()
        generate(model, ids, **kw)
        per_step[b] = (time.perf_counter() - start) / steps
    row_s = max(per_step[128] - per_step[16], 0.0) / 112
    overhead = max(per_step[16] - 16 * row_s, 0.0)
    # Train: one jitted actor update over packed sequences of the benchmark's size.
    from jaxrlhf.interfaces import (
        ActorLossSpec,
        actor_microbatch_loss,
        init_train_state,
        pack_sequences,
        run_train_step,
    )
    from jaxrlhf.system.specs import optimizer_spec

    seqs = [np.full(24, 5, np.int32) for _ in range(128)]
    ones = [np.concatenate([[0.0], np.ones(23)]).astype(np.float32) for _ in range(128)]
    packed = pack_sequences(seqs, {"loss_mask": ones, "advantages": ones},
                            max_tokens_per_mb=2048)  # fmt: skip
    opt = optimizer_spec(cfg.actor.optimizer)
    state = init_train_state(model.params, model.config, opt, total_steps=10)
    spec = ActorLossSpec(on_policy=True)
    state, _ = run_train_step(actor_microbatch_loss, state, packed, cfg=model.config,
                              spec=spec, opt=opt, total_steps=10)  # fmt: skip
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, m = run_train_step(actor_microbatch_loss, state, packed, cfg=model.config,
                              spec=spec, opt=opt, total_steps=10)  # fmt: skip
    jax.block_until_ready(m)
    train_token_s = (time.perf_counter() - start) / (128 * 24)
    both = Costs(overhead, row_s, 0.0, 0.0, row_s, train_token_s, 0.0)
    # One core each in async: compute costs double, the fixed step overhead does not.
    one = dataclasses.replace(both, row_s=2 * row_s, prefill_token_s=2 * row_s,
                              train_token_s=2 * train_token_s)  # fmt: skip
    cpu = argparse.Namespace(**{**vars(a), "batch": 16, "group": 8, "prompt_len": 8,
                                "median_len": a.cpu_median_len, "len_sigma": a.cpu_len_sigma,
                                "max_len": 256, "slots": 128, "eta": 2})  # fmt: skip
    # The CPU benchmark's sync path is the batch `generate`, not a continuous-batching server.
    sync = simulate_sync(both, 1, argparse.Namespace(**vars(cpu), static_batch=True))
    asy = simulate_async(one, 1, 1, cpu)
    return {
        "decode_step_s": per_step,
        "train_token_s": train_token_s,
        "cpu_projection": {
            "sync_samples_per_s": sync,
            "async": asy,
            "ratio": asy["samples_per_s"] / sync,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eta", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="simulated train steps (timed)")
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="prompts per train step")
    ap.add_argument("--group", type=int, default=16, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--median-len", type=float, default=4000)
    ap.add_argument("--len-sigma", type=float, default=0.8)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--slots", type=int, default=256, help="running sequences per GPU")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--hbm-gbs", type=float, default=3350.0)
    ap.add_argument("--link-gbs", type=float, default=50.0)
    ap.add_argument("--eff-bw", type=float, default=0.6)
    ap.add_argument("--eff-decode", type=float, default=0.3)
    ap.add_argument("--mfu", type=float, default=0.35)
    ap.add_argument("--step-overhead-ms", type=float, default=2.0)
    ap.add_argument("--calibrate", action="store_true", help="measure here and project the CPU")
    # The CPU benchmark's lengths (async_vs_sync.py defaults): median 27, p90 124, cap 256.
    ap.add_argument("--cpu-median-len", type=float, default=27.0)
    ap.add_argument("--cpu-len-sigma", type=float, default=1.2)
    a = ap.parse_args()
    result: dict = {"eta": a.eta, "areal_max_speedup": AREAL_MAX_SPEEDUP, "projections": {}}
    for model in MODELS:
        for gpus in (16, 32, 64):
            r = project(model, gpus, a)
            result["projections"][f"{model}/{gpus}gpu"] = r
            print(f"{model:>5} {gpus:>3} GPUs: sync {r['sync_samples_per_s']:8.1f} samples/s, "
                  f"async {r['async']['samples_per_s']:8.1f} ({r['async']['gen_gpus']} gen / "
                  f"{r['async']['train_gpus']} train, staleness mean "
                  f"{r['async']['staleness_mean']:.2f}): {r['ratio']:.2f}x "
                  f"(AReaL: up to {AREAL_MAX_SPEEDUP}x)")  # fmt: skip
    if a.calibrate:
        result["calibration"] = calibrate(a)
        c = result["calibration"]["cpu_projection"]
        print(f"CPU projection (measured costs): {c['ratio']:.2f}x async over sync")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
