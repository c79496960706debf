"""N local processes of one multi-process run (development and tests).

    python launchers/local_processes.py -n 2 --cpu-devices 2 -- launchers/ppo.py \\
        --config configs/toy_ppo.yaml experiment.total_steps=4

Each child gets ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (read
by `jaxrlhf.system.distributed.initialize`) and, with ``--cpu-devices``, that many forced CPU
devices and gloo collectives. Output lines are prefixed with ``[pN]``. When a child fails the
others get ``--grace`` seconds to notice (the heartbeat names the dead process) before they are
killed; the exit status is the first failure's, or 0.
"""

from __future__ import annotations

import argparse
import sys

from jaxrlhf.system.local_processes import launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--num-processes", type=int, default=2)
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="forced CPU devices per process (gloo collectives)")  # fmt: skip
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--grace", type=float, default=90.0,
                        help="seconds the others get after one process fails")  # fmt: skip
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py [args ...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the script to run after --, e.g. -- launchers/ppo.py --config X.yaml")
    return launch(command, args.num_processes, cpu_devices=args.cpu_devices, port=args.port,
                  grace_s=args.grace)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
