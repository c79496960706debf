"""One process of a toy PPO run for `test_distributed.py` (spawned 1 or N times).

    python multiprocess_ppo.py OUT_DIR [key=value ...]

Runs `launchers/ppo.py`'s path (``distributed.initialize``, the coordinator, ``finish``) on
``configs/toy_ppo.yaml`` with the overrides; process 0 then writes ``OUT_DIR/result.npz`` (the
final actor params) and ``OUT_DIR/result.json`` (metric and eval history). With
``JAXRLHF_TEST_DIE=<process>:<step>[:STOP]`` that process SIGKILLs (SIGSTOPs: hangs) itself
inside the actor update of that step, after writing the time to ``OUT_DIR/died_at``.

After the run every process commits 3 trajectories to a shared `TrajectoryBuffer`, process 0
picks a batch of 4, every process reads its slice and writes ``OUT_DIR/shard<i>.json``.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxrlhf.config import load_config  # noqa: E402
from jaxrlhf.system import distributed  # noqa: E402


def digit_count_reward(response: str, answer: str) -> float:
    """A dense toy reward (digits in the response) so that every step has a gradient."""
    return sum(c.isdigit() for c in response) / 4.0


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(ROOT / "configs" / "toy_ppo.yaml",
                      [f"experiment.output_dir={out}", *overrides])  # fmt: skip
    distributed.initialize(cfg.distributed)

    import jax
    import numpy as np

    from jaxrlhf.hostio import fetch
    from jaxrlhf.system import mfcs
    from jaxrlhf.system.coordinator import PPOCoordinator

    die = os.environ.get("JAXRLHF_TEST_DIE")
    if die:
        pid, step, *how = die.split(":")
        pid, step = int(pid), int(step)
        sig = signal.SIGSTOP if how == ["STOP"] else signal.SIGKILL  # STOP: a hung process
        train = mfcs.PPOActor.train

        def dying_train(ctx, mfc, data):
            if ctx.step == step and jax.process_index() == pid:
                (out / "died_at").write_text(repr(time.time()))
                os.kill(os.getpid(), sig)
            return train(ctx, mfc, data)

        mfcs.PPOActor.train = staticmethod(dying_train)

    def run():
        coordinator = PPOCoordinator(cfg)
        with coordinator.logger:
            coordinator.run()
        return coordinator

    coordinator = distributed.guarded(run)
    flat = jax.tree_util.tree_flatten_with_path(fetch(coordinator.models.actor.params))[0]
    if distributed.is_main():
        np.savez(out / "result.npz", **{jax.tree_util.keystr(k): v for k, v in flat})
        result = {"history": coordinator.history, "eval": coordinator.eval_history,
                  "processes": jax.process_count(), "devices": jax.device_count()}  # fmt: skip
        (out / "result.json").write_text(json.dumps(result))
    handoff(out / "buffer")
    distributed.finish()


def handoff(root: Path) -> None:
    """Trajectories written by every host, one global batch chosen by process 0, read in
    per-process slices (`TrajectoryBuffer.take_batch`)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxrlhf.system.buffer import TrajectoryBuffer

    buf, pid = TrajectoryBuffer(str(root)), jax.process_index()
    for i in range(3):
        buf.put(f"p{pid}-{i}", {"input_ids": np.full(4, 10 * pid + i, np.int32)})
    multihost_utils.sync_global_devices("trajectories_committed")
    uids, mine = buf.take_batch(4)
    buf.mark_consumed(uids, write=distributed.is_main())
    shard = {"batch": uids, "mine": [t.uid for t in mine],
             "values": [int(t.arrays["input_ids"][0]) for t in mine]}  # fmt: skip
    (root.parent / f"shard{pid}.json").write_text(json.dumps(shard))


if __name__ == "__main__":
    main()
