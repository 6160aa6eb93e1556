"""Run a function in each process of a local Gloo group (torch.multiprocessing.spawn): the DDP unit tests' harness."""
import os
import tempfile

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from common import dist as cd


def _worker(rank, world, port, fn, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), f"{out}/r{rank}.pt")  # what fn made is freed on return, as in a run
        tdist.barrier()
    finally:
        tdist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where Gloo now and then aborts a finished process (SIGABRT)


def on_processes(fn, *args, world=2):
    """``[fn(rank, world, *args) for every rank]``, each computed in its own process of one Gloo group (``fn`` a
    module-level function, its result anything ``torch.save`` takes)."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, cd._free_port(), fn, args, out), nprocs=world)
        return [torch.load(f"{out}/r{r}.pt", weights_only=False) for r in range(world)]
