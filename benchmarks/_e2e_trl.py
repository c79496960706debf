"""TRL's `GRPOTrainer` on a randomly initialised Qwen2 of a given shape: seconds per RL step.

Started by `benchmarks/e2e.py` with the Python of a separate venv that has trl and a CPU torch.
One step: 1 prompt x ``--group`` samples of exactly ``--new`` tokens (``min_new_tokens`` holds EOS
back), beta 0 (no reference model), one update per batch (``num_iterations=1``,
``steps_per_generation=1``, so TRL skips the old-log-prob pass as well). The tokenizer is built
here: words ``t<id>`` map one to one to ids, so nothing is downloaded. Step times are the intervals
between the trainer's step-end callbacks (generation, rewards, loss, backward and the optimizer
step all happen in between). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def word_tokenizer(vocab: int):
    """A fast tokenizer over the words ``t0 .. t<vocab-1>``; pad ``t0``, EOS the last word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="t0", eos_token=f"t{vocab - 1}", unk_token="t1"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="JSON: HF Qwen2Config fields")
    ap.add_argument("--prompt-len", type=int, default=6)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: default")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    hf = json.loads(args.model)

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocab = hf["vocab_size"]
    tokenizer = word_tokenizer(vocab)
    model = Qwen2ForCausalLM(
        Qwen2Config(**hf, pad_token_id=0, eos_token_id=vocab - 1, bos_token_id=None)
    ).float()

    rng = np.random.default_rng(args.seed)
    prompts = [
        " ".join(f"t{i}" for i in rng.integers(2, vocab - 1, args.prompt_len))
        for _ in range(args.steps + 1)
    ]
    lengths: list[int] = []

    def even_token_reward(prompts, completions, completion_ids, **_) -> list[float]:
        """A cheap reward with spread inside a group: the fraction of even token ids."""
        lengths.extend(len(ids) for ids in completion_ids)
        return [float(np.mean([i % 2 == 0 for i in ids])) if ids else 0.0
                for ids in completion_ids]  # fmt: skip

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, *_, **__):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            self.marks.append(time.perf_counter())

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.group,  # completions per device and step
            num_generations=args.group,
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_iterations=1,
            beta=0.0,
            max_completion_length=args.new,
            generation_kwargs={"min_new_tokens": args.new},
            temperature=1.0,
            learning_rate=args.lr,
            max_steps=args.steps + 1,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            fp16=False,
            seed=args.seed,
            shuffle_dataset=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=even_token_reward,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.train()
    steps = np.diff(clock.marks).tolist()
    print(json.dumps({
        "status": "ok",
        "first_step_s": steps[0],
        "step_s": steps[1:],
        "updates": len(steps),
        "completion_len_min": min(lengths),
        "completion_len_max": max(lengths),
        "torch_threads": torch.get_num_threads(),
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
