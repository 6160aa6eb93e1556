"""msbreg.py under 2-process DDP (Gloo, torch.multiprocessing.spawn): the covariance of L_s (Eq. 5-6) is over
the global batch, the Brownian noise of each image is the one-process noise, and the whole loss of Eq. 2 and
its DDP-averaged gradient equal the one-process values on the same global batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import msbreg as ms
from common import dist as cd

K, B, D_IN, D = 4, 16, 6, 5
LAM_S, LAM_B = 0.05, 0.5


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, D))


def _losses(model, xs, z_t, noise, gather):
    """The loss of msbreg.train on one (local) batch: xs [K, b, D_IN], z_t [K, b, D]."""
    p = torch.stack([model(x) for x in xs])
    n = noise(p.shape[1])
    l_c = ms.centroid_loss(p, z_t).mean()
    p_all = gather(p.transpose(0, 1).contiguous()).transpose(0, 1)
    l_s = ms.singular_value_loss(p_all)
    l_b = ms.brownian_loss(p, n).mean()
    return l_c + LAM_S * l_s + LAM_B * l_b, l_s, n


def _worker(rank, world, port, xs, z_t, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(cd.convert_sync_bn(_net(), on_cuda=False))
        rows = slice(rank, None, world)  # the sampler's split: rank r holds global rows r, r+W, ...
        noise = ms.BrownianNoise(D, seed=11, device="cpu")
        loss, l_s, n = _losses(model, xs[:, rows], z_t[:, rows], noise, cd.all_gather_grad)
        loss.backward()
        result = {"loss": cd.all_reduce_mean(loss), "l_s": l_s.detach(), "noise": n,
                  "grads": [p.grad for p in model.parameters()]}
        torch.save(result, f"{out}{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where Gloo now and then aborts a finished process (SIGABRT)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_singular_value_loss_is_over_the_global_batch(tmp_path):
    xs, z_t = torch.randn(K, B, D_IN), torch.randn(K, B, D)
    mp.spawn(_worker, args=(2, _port(), xs, z_t, str(tmp_path / "r")), nprocs=2)
    got = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]
    ref = _net()
    loss, l_s, n = _losses(ref, xs, z_t, ms.BrownianNoise(D, seed=11, device="cpu"), lambda t: t)
    loss.backward()
    # L_s: the same global value on both ranks, equal to one process over all B rows
    for g in got:
        torch.testing.assert_close(g["l_s"], l_s.detach(), rtol=1e-5, atol=1e-6)
    # local-batch L_s would differ (the covariance of 8 rows is not the covariance of 16)
    assert abs(ms.singular_value_loss(torch.stack([ref(x) for x in xs[:, 0::2]])).item() - l_s.item()) > 1e-3
    # each image's noise is the one-process noise
    torch.testing.assert_close(got[0]["noise"], n[0::2])
    torch.testing.assert_close(got[1]["noise"], n[1::2])
    # the logged loss and the DDP-averaged gradient equal one process's
    assert abs(got[0]["loss"].item() - loss.item()) < 1e-5
    for g, p in zip(got[0]["grads"], ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
