"""The PPO / GRPO coordinator: runs the dataflow graph once per step, sync or async.

Host-side only: it owns the models' train states, the eval sampler and the data iterators, and
runs the graph's MFCs (`jaxrlhf.system.mfcs`) through `jaxrlhf.dfg.run_graph`. Where the step's
samples come from is the `GenerationStrategy` it is given (`SyncGeneration`: generate on the
current weights; `AsyncGeneration`: a generation server running alongside). After the train
MFCs the policy version increments and the strategy publishes the new weights. The loop,
checkpoints, resume and logging are `jaxrlhf.system.run_loop.RunLoop`'s.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from jaxrlhf.config import Config, ConfigError
from jaxrlhf.data.pipeline import PromptBatch, build_prompt_pipeline
from jaxrlhf.dfg import DataflowGraph, build_graph, run_graph
from jaxrlhf.generation.sampler import Sampler
from jaxrlhf.interfaces import init_train_state, pack_sequences, run_train_step
from jaxrlhf.interfaces.packing import ShapeFloors, bucket_size
from jaxrlhf.interfaces.sft import SFTLossSpec, sft_microbatch_loss
from jaxrlhf.logging import MetricsLogger, compile_totals
from jaxrlhf.models import ModelHandle, build_model
from jaxrlhf.models.build import build_critic, build_reference
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.hf_io import resolve_model_dir
from jaxrlhf.system.generation_strategy import GenerationStrategy, generation_strategy
from jaxrlhf.system.mfcs import Models, StepContext
from jaxrlhf.system.reward_model import load_reward_model
from jaxrlhf.system.rollout import generate_trajectories
from jaxrlhf.system.run_loop import RunLoop
from jaxrlhf.system.scoring import Scorer
from jaxrlhf.system.specs import optimizer_spec

# Every process reads the whole global batch (the same host program on the same data); device
# arrays built from it hold only each process's shards (`jaxrlhf.hostio.put`).
GLOBAL_BATCH = {"process_index": 0, "process_count": 1}


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
        metadata=tuple(m for b in batches for m in b.metadata),
    )


class PPOCoordinator(RunLoop):
    """Build everything a PPO / GRPO run needs from ``cfg``, then `run` it.

    ``generation``: where samples come from (default: the strategy ``experiment.mode`` names).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        logger: MetricsLogger | None = None,
        generation: GenerationStrategy | None = None,
    ) -> None:
        self.generation = generation if generation is not None else generation_strategy(cfg)
        super().__init__(cfg, devices=self.generation.train_devices())
        self.graph: DataflowGraph = build_graph(cfg)
        self.impls = self.graph.resolve_interfaces()
        self.scorer = Scorer(cfg)  # closed at the end of `run`
        algo = cfg.algorithm
        self.updates_per_run = cfg.experiment.total_steps * algo.ppo_epochs * algo.n_minibatches
        self.train_pipe = build_prompt_pipeline(
            cfg.data, self.tokenizer, seed=cfg.experiment.seed, **GLOBAL_BATCH
        )
        self.eval_pipe = build_prompt_pipeline(
            cfg.data, self.tokenizer, split="eval", seed=cfg.experiment.seed, **GLOBAL_BATCH
        )
        compile_totals()  # start counting compilation (perf/compile_s)
        self.version = 0
        self.shape_floors = ShapeFloors()  # packed shapes only grow: few recompiles per run
        self.last_trajectories = None  # the batch the last step trained on

        self._check_model_paths()  # before the SFT warm start, not after it
        actor = build_model(cfg.actor, mesh=self.mesh, seed=cfg.experiment.seed)
        self._check_vocab(actor.config)
        self._check_positions(actor.config)
        if not self.resuming:  # a resumed run restores the warmed-up weights instead
            actor = self._sft_warmup(actor)
        self.models = self._fresh_models(actor)
        restored = self.restore()
        self.restored_extra: dict[str, Any] = {} if restored is None else restored.host.extra
        self.version = int(self.restored_extra.get("version", 0))
        self.data_iter = self.train_pipe.iterator(
            None if restored is None else restored.host.data_state
        )
        self.sampler = Sampler(self.models.actor_cfg, self.models.actor.params, self.mesh)
        self._sampler_version = self.version
        self.start_logging(logger)
        self.generation.attach(self)

    # ----------------------------------------------------------------------- building

    def _check_vocab(self, cfg: TransformerConfig, what: str = "actor.vocab_size") -> None:
        if len(self.tokenizer) > cfg.vocab_size:
            raise ConfigError(
                f"{what}={cfg.vocab_size} is smaller than the tokenizer's "
                f"{len(self.tokenizer)} tokens."
            )

    def _check_model_paths(self) -> None:
        """Every model directory the run will load exists (one sentence naming the key if not)."""
        c = self.cfg
        paths = {
            "critic.path": c.critic.path if c.use_critic else None,
            "ref.path": c.ref.path if c.use_ref else None,
            "reward_model.path": c.reward_model.path if c.reward_model.enabled else None,
        }
        for key, path in paths.items():
            if path is not None:
                resolve_model_dir(path, key)

    def _check_positions(self, cfg: TransformerConfig) -> None:
        """Prompt + response must fit the model (a from-scratch model is checked by the config;
        a loaded one only here, before anything compiles)."""
        longest = self.cfg.data.max_prompt_len + self.cfg.generation.max_new_tokens
        if longest > cfg.max_position_embeddings:
            raise ConfigError(
                f"data.max_prompt_len + generation.max_new_tokens ({longest}) must be <= the "
                f"actor's max_position_embeddings ({cfg.max_position_embeddings})."
            )

    def _fresh_models(self, actor: ModelHandle) -> Models:
        """Train states around ``actor`` (the RL start point) plus the models derived from it;
        on resume their shapes and shardings are what the checkpoint is read into."""
        cfg = self.cfg
        models = Models(actor_cfg=actor.config, actor=None)  # type: ignore[arg-type]
        if cfg.use_ref:  # built before the actor's state, which takes (donates) its params
            ref = build_reference(cfg.ref, actor, mesh=self.mesh)
            models.ref_cfg, models.ref_params = ref.config, ref.params
        if cfg.reward_model.enabled:  # frozen; loaded from its export, never checkpointed
            rm = cfg.reward_model
            handle = load_reward_model(rm.path, rm.param_dtype, compute_dtype=rm.compute_dtype,
                                       mesh=self.mesh)  # fmt: skip
            self._check_vocab(handle.config, "the vocab_size of reward_model.path")
            models.rm_cfg, models.rm_params = handle.config, handle.params
        if cfg.use_critic:
            critic = build_critic(cfg.critic, actor, mesh=self.mesh)
            models.critic_cfg = critic.config
            models.critic = init_train_state(
                critic.params, critic.config, optimizer_spec(cfg.critic.optimizer),
                total_steps=self.updates_per_run, mesh=self.mesh,
            )  # fmt: skip
        models.actor = init_train_state(
            actor.params, actor.config, optimizer_spec(cfg.actor.optimizer),
            total_steps=self.updates_per_run, mesh=self.mesh,
        )  # fmt: skip
        return models

    def _sft_warmup(self, actor: ModelHandle) -> ModelHandle:
        """``sft_warmup.steps`` supervised steps on (prompt, reference answer + EOS), with the
        SFT trainer's step (response-token NLL), before RL starts."""
        w = self.cfg.sft_warmup
        if w.steps == 0:
            return actor
        opt = dataclasses.replace(optimizer_spec(self.cfg.actor.optimizer), lr=w.lr,
                                  warmup_steps=0, schedule="constant")  # fmt: skip
        state = init_train_state(actor.params, actor.config, opt, total_steps=w.steps,
                                 mesh=self.mesh)  # fmt: skip
        data_cfg = dataclasses.replace(self.cfg.data, batch_size=w.batch_size)
        pipe = build_prompt_pipeline(
            data_cfg, self.tokenizer, seed=self.cfg.experiment.seed + 1, **GLOBAL_BATCH
        )
        it = pipe.iterator()
        eos = self.tokenizer.eos_token_id
        width = bucket_size(self.cfg.data.max_prompt_len + self.cfg.generation.max_new_tokens)
        for _ in range(w.steps):
            batch = next(it)
            seqs, masks = [], []
            for ids, mask, answer in zip(batch.input_ids_bt, batch.attention_mask_bt,
                                         batch.answers, strict=True):  # fmt: skip
                prompt = ids[mask.astype(bool)]
                target = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
                seqs.append(np.concatenate([prompt, target]).astype(np.int32))
                masks.append(np.concatenate([np.zeros(len(prompt)), np.ones(len(target))]))
            packed = pack_sequences(
                seqs, {"loss_mask": [m.astype(np.float32) for m in masks]}, row_len=width,
                max_tokens_per_mb=max(self.cfg.actor.max_tokens_per_mb, width),
                rows_multiple=self.batch_shards,
            )  # fmt: skip
            state, _ = run_train_step(sft_microbatch_loss, state, packed, cfg=actor.config,
                                      spec=SFTLossSpec(), opt=opt, total_steps=w.steps,
                                      mesh=self.mesh)  # fmt: skip
        self.say(f"sft warm start: {w.steps} steps at lr {w.lr:g}")
        return dataclasses.replace(actor, params=state.params)

    @property
    def batch_shards(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    # ----------------------------------------------------------------------- run-loop hooks

    def state_tree(self) -> dict[str, Any]:
        tree = {"actor": self.models.actor}
        if self.models.critic is not None:
            tree["critic"] = self.models.critic
        if self.models.ref_params is not None:
            tree["ref_params"] = self.models.ref_params
        return tree

    def set_state_tree(self, tree: dict[str, Any]) -> None:
        for key, value in tree.items():
            setattr(self.models, key, value)

    def data_state(self) -> Any:
        return self.generation.data_state()

    def host_extra(self) -> dict[str, Any]:
        return {"version": self.version} | self.generation.host_extra()

    def save(self, metrics: dict[str, Any] | None = None) -> None:
        with self.generation.save_lock():
            super().save(metrics)

    def export(self) -> str | None:
        if not self.cfg.checkpoint.save_hf:
            return None
        handle = ModelHandle(self.models.actor_cfg, self.models.actor.params, self.mesh)
        return self.checkpointer.export_hf(handle, tokenizer=self.tokenizer)

    def run(self) -> dict[str, Any]:
        """Train as `RunLoop.run` does; background generation and reward workers stop at the
        end."""
        try:
            return super().run()
        finally:
            self.close()

    def close(self) -> None:
        """Stop background generation and the reward workers (a run does this itself)."""
        self.generation.close()
        self.scorer.close()

    # ----------------------------------------------------------------------- steps

    def current_sampler(self) -> Sampler:
        """The sampler, with the current actor weights (converted when the policy moved)."""
        if self._sampler_version != self.version:
            self.sampler.params = self.sampler.convert(self.models.actor.params)
            self._sampler_version = self.version
        return self.sampler

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
        traj = generate_trajectories(self.current_sampler(), batch, self.tokenizer,
                                     self.cfg.generation, seed=0, version=self.version,
                                     greedy=True)  # fmt: skip
        scores, _ = self.scorer.score(traj)  # as training scores: reward.scale / clip apply
        return {
            "eval/reward": float(scores.mean()),
            "eval/response_len": float(traj.response_lens.mean()),
            "eval/prompts": len(scores),
        }

    def step_context(self) -> StepContext:
        """What this step's MFC implementations see."""
        return StepContext(
            cfg=self.cfg, mesh=self.mesh, models=self.models, generation=self.generation,
            tokenizer=self.tokenizer, scorer=self.scorer, step=self.step,
            version=self.version, updates_per_run=self.updates_per_run,
            shape_floors=self.shape_floors,
        )  # fmt: skip

    def train_step(self) -> dict[str, Any]:
        """One RL step: the graph's MFCs in order, then the new weights are published."""
        self.step += 1
        start = time.perf_counter()
        compiled = compile_totals()["seconds"]
        ctx = self.step_context()
        self.last_reads: dict[str, set[str]] = {}  # MFC -> the keys it read (tests compare)

        def done(name: str, outputs: dict[str, Any], read: set[str]) -> None:
            jax.block_until_ready(outputs)  # so the MFC's timer measures its device work
            self.last_reads[name] = read

        data = run_graph(
            self.graph,
            self.impls,
            ctx,
            self.generation.step_inputs(),
            timer=self.logger.time,
            on_output=done,
        )
        self.version += 1
        with self.logger.time("weight_sync"):
            self.generation.publish(self.version)
        traj = self.last_trajectories = data["trajectories"]
        seconds = time.perf_counter() - start
        ctx.metrics |= {
            "perf/tokens_per_s": int(sum(len(x) for x in traj.input_ids)) / seconds,
            "perf/step_s": seconds,
            "perf/compile_s": compile_totals()["seconds"] - compiled,
            "policy/version": self.version,
        }
        ctx.metrics |= self.generation.step_metrics(traj, start)
        return ctx.metrics
