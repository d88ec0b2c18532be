"""Reproducer of the exit-time SIGABRT in docs/LEARNED.md (not a test: the race is probabilistic).

    for i in $(seq 20); do torchrun --nproc_per_node=2 tests/repro_exit_abort.py plain || echo FAIL; done

A Parameter with a Python attribute (as ZeRO-3's carry) goes through an all_reduce just before exit;
rank 1 joins it late. `plain` exits the ordinary way (aborts now and then with "terminate called
without an active exception"), `fixed` leaves through launcher.dist.finish() and exit_process().
"""

import os
import random
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for launcher
from launcher import dist as launcher_dist


def main(mode: str) -> None:
    dist.init_process_group("gloo")
    t = torch.nn.Parameter(torch.ones(1000))
    t.ds_id = 1
    if dist.get_rank() == 0:
        handle = dist.all_reduce(t, async_op=True)
        del handle, t  # the gloo worker thread now holds the last reference
    else:
        time.sleep(random.uniform(0, 0.6))
        dist.all_reduce(t)
    if mode == "fixed":
        launcher_dist.finish()
        launcher_dist.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1])
