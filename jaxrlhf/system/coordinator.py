"""The synchronous PPO coordinator (`main_sync_ppo`): runs the dataflow graph once per step.

Host-side only: it owns the models' train states, the sampler, the data iterators, the
checkpointer and the logger, and calls the MFC implementations (`jaxrlhf.system.mfcs`) in the
graph's order. After the train MFCs it syncs the new actor weights to the sampler and bumps the
policy version, which every generated token records.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.checkpoint import Checkpointer, HostState, abstract_like
from jaxrlhf.config import Config, ConfigError, config_to_yaml, save_config
from jaxrlhf.data.pipeline import PromptBatch, build_prompt_pipeline, load_tokenizer
from jaxrlhf.dfg import DataflowGraph, build_graph
from jaxrlhf.generation.sampler import Sampler
from jaxrlhf.interfaces import (
    ActorLossSpec,
    actor_train,
    init_train_state,
    pack_sequences,
)
from jaxrlhf.interfaces.packing import ShapeFloors, bucket_size
from jaxrlhf.logging import MetricsLogger, compile_totals, history_entry
from jaxrlhf.models import (
    MeshError,
    ModelHandle,
    build_model,
    from_pretrained,
    make_mesh,
    param_shardings,
)
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.system import distributed
from jaxrlhf.system.mfcs import Models, StepContext
from jaxrlhf.system.reward_model import load_reward_model
from jaxrlhf.system.rollout import generate_trajectories, reward_function

# Every process reads the whole global batch (the same host program on the same data); device
# arrays built from it hold only each process's shards (`jaxrlhf.hostio.put`).
GLOBAL_BATCH = {"process_index": 0, "process_count": 1}


def _copy(tree: Any) -> Any:
    """Fresh buffers: train steps donate their state, so models never share arrays."""
    return jax.tree.map(jnp.copy, tree)


def concat_batches(batches: list[PromptBatch]) -> PromptBatch:
    """One `PromptBatch` holding every row of ``batches`` (for a single eval generate call)."""
    return PromptBatch(
        input_ids_bt=np.concatenate([b.input_ids_bt for b in batches]),
        attention_mask_bt=np.concatenate([b.attention_mask_bt for b in batches]),
        prompts=tuple(p for b in batches for p in b.prompts),
        answers=tuple(a for b in batches for a in b.answers),
        row_ids_b=np.concatenate([b.row_ids_b for b in batches]),
        sample_ids_b=np.concatenate([b.sample_ids_b for b in batches]),
        step=batches[0].step,
    )


class PPOCoordinator:
    """Build everything a sync PPO / GRPO run needs from ``cfg``, then `run` it."""

    def __init__(self, cfg: Config, *, logger: MetricsLogger | None = None) -> None:
        if cfg.experiment.mode != "sync" and type(self) is PPOCoordinator:
            raise ConfigError(
                "experiment.mode='async' runs in jaxrlhf.system.async_ppo.AsyncPPOCoordinator "
                "(launchers/ppo.py picks it); PPOCoordinator is the sync loop."
            )
        self.cfg = cfg
        self.graph: DataflowGraph = build_graph(cfg)
        self.impls = self.graph.resolve_interfaces()
        try:
            self.mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor,
                                  devices=self._train_devices())  # fmt: skip
        except MeshError as e:
            raise ConfigError(str(e)) from None
        self.tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.actor.path)
        self.reward_fn = reward_function(cfg)
        algo = cfg.algorithm
        self.updates_per_run = cfg.experiment.total_steps * algo.ppo_epochs * algo.n_minibatches
        self.train_pipe = build_prompt_pipeline(
            cfg.data, self.tokenizer, seed=cfg.experiment.seed, **GLOBAL_BATCH
        )
        self.eval_pipe = build_prompt_pipeline(
            cfg.data, self.tokenizer, split="eval", seed=cfg.experiment.seed, **GLOBAL_BATCH
        )
        self.checkpointer = Checkpointer(cfg.checkpoint)
        self.logger = logger or MetricsLogger.from_config(cfg, is_main=distributed.is_main())
        compile_totals()  # start counting compilation (perf/compile_s)
        self.step = 0
        self.version = 0
        self.shape_floors = ShapeFloors()  # packed shapes only grow: few recompiles per run
        self.last_trajectories = None  # the batch the last step trained on
        self.history: list[dict[str, float]] = []
        self.eval_history: list[dict[str, float]] = []

        actor = build_model(cfg.actor, mesh=self.mesh, seed=cfg.experiment.seed)
        self._check_vocab(actor.config)
        restored = self._restore_target(actor)
        self.restored_extra: dict[str, Any] = {}  # the checkpoint's host extras, if resumed
        if restored is None:
            params = self._sft_warmup(actor)
            self.models = self._fresh_models(actor.config, params)
            self.data_iter = self.train_pipe.iterator()
        else:
            self.models, host = restored
            self.restored_extra = host.extra
            self.step = host.extra["step"]
            self.version = host.extra["version"]
            self.history = host.metric_history
            self.eval_history = host.extra.get("eval_history", [])
            self.data_iter = self.train_pipe.iterator(host.data_state)
        self.sampler = Sampler(self.models.actor_cfg, self.models.actor.params, self.mesh)

    # ----------------------------------------------------------------------- building

    def _train_devices(self) -> list[jax.Device] | None:
        """Devices of the train mesh: all of them (async PPO: the train sub-mesh)."""
        return None

    def _check_vocab(self, cfg: TransformerConfig, what: str = "actor.vocab_size") -> None:
        if len(self.tokenizer) > cfg.vocab_size:
            raise ConfigError(
                f"{what}={cfg.vocab_size} is smaller than the tokenizer's "
                f"{len(self.tokenizer)} tokens."
            )

    def _fresh_models(self, actor_cfg: TransformerConfig, params: Any) -> Models:
        cfg = self.cfg
        models = Models(actor_cfg=actor_cfg, actor=None)  # type: ignore[arg-type]
        if cfg.use_ref:
            if cfg.ref.path is None:  # the RL start point (after any SFT warm start)
                models.ref_cfg, models.ref_params = actor_cfg, _copy(params)
            else:
                ref = from_pretrained(cfg.ref.path, cfg.ref.param_dtype, mesh=self.mesh,
                                      compute_dtype=cfg.ref.compute_dtype)  # fmt: skip
                models.ref_cfg, models.ref_params = ref.config, ref.params
        if cfg.reward_model.enabled:  # frozen; loaded from its export, never checkpointed
            rm = cfg.reward_model
            handle = load_reward_model(rm.path, rm.param_dtype, compute_dtype=rm.compute_dtype,
                                       mesh=self.mesh)  # fmt: skip
            self._check_vocab(handle.config, "the vocab_size of reward_model.path")
            models.rm_cfg, models.rm_params = handle.config, handle.params
        if cfg.use_critic:
            models.critic_cfg, critic_params = self._critic_params(actor_cfg, params)
            models.critic = init_train_state(
                critic_params, models.critic_cfg, cfg.critic.optimizer,
                total_steps=self.updates_per_run, mesh=self.mesh,
            )  # fmt: skip
        models.actor = init_train_state(
            params, actor_cfg, cfg.actor.optimizer, total_steps=self.updates_per_run,
            mesh=self.mesh,
        )  # fmt: skip
        return models

    def _critic_params(self, actor_cfg: TransformerConfig, actor_params: Any):
        """The critic: ``critic.path`` with a fresh value head, or the actor's trunk."""
        c = self.cfg.critic
        if c.path is not None:
            handle = from_pretrained(c.path, c.param_dtype, compute_dtype=c.compute_dtype,
                                     mesh=self.mesh, remat=c.remat, lm_head=False,
                                     value_head=True)  # fmt: skip
            return handle.config, handle.params
        cfg = actor_cfg.replace(
            param_dtype=c.param_dtype, compute_dtype=c.compute_dtype, remat=c.remat
        )
        params = {k: v for k, v in _copy(actor_params).items() if k != "lm_head"}
        dtype = jnp.dtype(c.param_dtype)
        params = jax.tree.map(lambda a: a.astype(dtype), params)
        params["value_head"] = {
            "kernel": jnp.zeros((cfg.hidden_size,), dtype),
            "bias": jnp.zeros((), dtype),
        }
        return cfg, jax.device_put(
            params, param_shardings(cfg, self.mesh, lm_head=False, value_head=True)
        )

    def _restore_target(self, actor: ModelHandle):
        """(models, host state) from the latest complete checkpoint, or None for a fresh run."""
        if not self.cfg.checkpoint.resume or self.checkpointer.latest_step() is None:
            return None
        models = self._fresh_models(actor.config, actor.params)  # shapes and shardings only
        restored = self.checkpointer.restore(abstract_like(self._state_tree(models)))
        for key, value in restored.state.items():
            setattr(models, key, value)
        self.logger.print(f"resumed from step {restored.step} in {self.checkpointer.directory}")
        return models, restored.host

    @staticmethod
    def _state_tree(models: Models) -> dict[str, Any]:
        tree = {"actor": models.actor}
        if models.critic is not None:
            tree["critic"] = models.critic
        if models.ref_params is not None:
            tree["ref_params"] = models.ref_params
        return tree

    # ----------------------------------------------------------------------- SFT warm start

    def _sft_warmup(self, actor: ModelHandle) -> Any:
        """Supervised steps on (prompt, reference answer + EOS): the gradient of the token NLL,
        computed as an on-policy policy gradient with advantage 1 (same compiled step)."""
        w = self.cfg.sft_warmup
        if w.steps == 0:
            return actor.params
        opt = dataclasses.replace(self.cfg.actor.optimizer, lr=w.lr, warmup_steps=0,
                                  schedule="constant")  # fmt: skip
        state = init_train_state(actor.params, actor.config, opt, total_steps=w.steps,
                                 mesh=self.mesh)  # fmt: skip
        spec = ActorLossSpec(on_policy=True)
        data_cfg = dataclasses.replace(self.cfg.data, batch_size=w.batch_size)
        pipe = build_prompt_pipeline(
            data_cfg, self.tokenizer, seed=self.cfg.experiment.seed + 1, **GLOBAL_BATCH
        )
        it = pipe.iterator()
        eos = self.tokenizer.eos_token_id
        width = bucket_size(self.cfg.data.max_prompt_len + self.cfg.generation.max_new_tokens)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        for _ in range(w.steps):
            batch = next(it)
            seqs, masks = [], []
            for ids, mask, answer in zip(batch.input_ids_bt, batch.attention_mask_bt,
                                         batch.answers, strict=True):  # fmt: skip
                prompt = ids[mask.astype(bool)]
                target = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
                seqs.append(np.concatenate([prompt, target]).astype(np.int32))
                masks.append(np.concatenate([np.zeros(len(prompt)), np.ones(len(target))]))
            ones = [m.astype(np.float32) for m in masks]
            packed = pack_sequences(
                seqs, {"loss_mask": ones, "advantages": ones}, row_len=width,
                max_tokens_per_mb=max(self.cfg.actor.max_tokens_per_mb, width),
                rows_multiple=shards,
            )  # fmt: skip
            state, _ = actor_train(state, packed, cfg=actor.config, spec=spec, opt_cfg=opt,
                                   total_steps=w.steps, mesh=self.mesh)  # fmt: skip
        self.logger.print(f"sft warm start: {w.steps} steps at lr {w.lr:g}")
        return state.params

    # ----------------------------------------------------------------------- loop

    def evaluate(self) -> dict[str, float]:
        """Greedy responses to the held-out prompts (up to ``data.eval_size``): mean reward."""
        batches, count = [], 0
        limit = self.cfg.data.eval_size
        for batch in self.eval_pipe.iterator():
            batches.append(batch)
            count += len(batch)
            if limit is not None and count >= limit:
                break
        batch = concat_batches(batches)
        if limit is not None:
            batch = dataclasses.replace(
                batch, **{f.name: getattr(batch, f.name)[:limit]
                          for f in dataclasses.fields(batch) if f.name != "step"},
            )  # fmt: skip
        traj = generate_trajectories(self.sampler, batch, self.tokenizer, self.cfg.generation,
                                     seed=0, version=self.version, greedy=True)  # fmt: skip
        scores = np.asarray([self.reward_fn(r, a) for r, a in
                             zip(traj.responses, traj.answers, strict=True)])  # fmt: skip
        return {
            "eval/reward": float(scores.mean()),
            "eval/response_len": float(traj.response_lens.mean()),
            "eval/prompts": len(scores),
        }

    def step_context(self) -> StepContext:
        """What this step's MFC implementations see."""
        return StepContext(
            cfg=self.cfg, mesh=self.mesh, models=self.models, sampler=self.sampler,
            tokenizer=self.tokenizer, reward_fn=self.reward_fn, step=self.step,
            version=self.version, updates_per_run=self.updates_per_run,
            shape_floors=self.shape_floors,
        )  # fmt: skip

    def train_step(self) -> dict[str, Any]:
        """One RL step: run every MFC of the graph, then sync weights to the sampler."""
        self.step += 1
        start = time.perf_counter()
        compiled = compile_totals()["seconds"]
        ctx = self.step_context()
        data: dict[str, Any] = {"prompt_batch": next(self.data_iter)}
        distributed.check_same(data["prompt_batch"].sample_ids_b, "the step's prompt batch")
        data["prompt_ids"] = data["prompt_batch"].input_ids_bt
        data["answers"] = data["prompt_batch"].answers
        for name in self.graph.order:
            mfc = self.graph[name]
            with self.logger.time(name):
                outputs = getattr(self.impls[name], mfc.interface_type)(ctx, mfc, data)
                jax.block_until_ready(outputs)
            data.update(outputs)
        self.sampler.params = self.sampler.convert(self.models.actor.params)
        self.version += 1
        seconds = time.perf_counter() - start
        traj = self.last_trajectories = data["trajectories"]
        tokens = int(sum(len(x) for x in traj.input_ids))
        ctx.metrics |= {
            "perf/tokens_per_s": tokens / seconds,
            "perf/step_s": seconds,
            "perf/compile_s": compile_totals()["seconds"] - compiled,
            "policy/version": self.version,
        }
        return ctx.metrics

    def host_state(self) -> HostState:
        """The host side of a checkpoint: data position, history, config, counters."""
        return HostState(
            data_state=self.data_iter.get_state(),
            metric_history=self.history,
            config=config_to_yaml(self.cfg),
            extra={"step": self.step, "version": self.version, "eval_history": self.eval_history},
        )

    def save(self) -> None:
        self.checkpointer.save(self.step, self._state_tree(self.models), self.host_state())

    def _stop_requested(self) -> bool:
        """A ``STOP`` file in the output directory ends the run after a save; process 0 looks,
        the others follow its decision."""
        stop = Path(self.cfg.experiment.output_dir) / "STOP"
        if not distributed.decide(stop.exists()):
            return False
        self.logger.print(f"{stop} found: saving and stopping at step {self.step}")
        self.save()
        return True

    def run(self) -> dict[str, Any]:
        """Train to ``experiment.total_steps`` with evaluations, checkpoints and logging.

        Returns a summary: eval reward before and after, steps run, wall seconds.
        """
        cfg = self.cfg
        total = cfg.experiment.total_steps
        if distributed.is_main():
            save_config(cfg, f"{cfg.experiment.output_dir}/config.yaml")
        start = time.perf_counter()
        before = self.eval_history[0] if self.eval_history else None
        if before is None:
            before = self.evaluate() | {"step": self.step}
            self.eval_history.append(before)
            self.logger.log(self.step, before)
        while self.step < total and not self._stop_requested():
            metrics = self.train_step()
            every = cfg.experiment.eval_every
            if (every and self.step % every == 0) or self.step == total:
                ev = self.evaluate()
                self.eval_history.append(ev | {"step": self.step})
                metrics |= ev
            logged = self.logger.log(self.step, metrics)
            self.history.append(history_entry(logged))
            if distributed.decide(self.checkpointer.should_save(self.step, total)):
                self.save()
        self.checkpointer.close()
        if cfg.checkpoint.save_hf:
            handle = ModelHandle(self.models.actor_cfg, self.models.actor.params, self.mesh)
            self.checkpointer.export_hf(handle, tokenizer=self.tokenizer)
        after = self.eval_history[-1]
        return {
            "before": before,
            "after": after,
            "steps": self.step,
            "seconds": time.perf_counter() - start,
        }
