"""msbreg.py's step (``msbreg_loss``) under 2-process DDP (Gloo): the covariance of L_s (Eq. 5-6) is over the
global batch, the Brownian noise of each image is the one-process noise, and the loss of Eq. 2 and its
DDP-averaged gradient equal the one-process values on the same global batch."""
import torch
from gloo import on_processes

from common import dist as cd
from common.config import Cfg

import msbreg as ms

K, B, D_IN, D = 4, 16, 6, 5
LOSS = Cfg(K=K, lambda_s=0.05, lambda_b=0.5, s_normalized=False, centroid=True)


class Views(torch.nn.Module):
    """A small online network with BatchNorm, called as msbreg's MultiViewOnline: K views in, (z, p) out, each
    [K, B, D] (here p = z: no predictor)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(D_IN, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                       torch.nn.Linear(8, D))

    def forward(self, views):
        z = torch.stack([self.net(x) for x in views])
        return z, z


def _target():
    torch.manual_seed(1)
    return torch.nn.Linear(D_IN, D)


def _rank_step(rank, world, xs):
    model = torch.nn.parallel.DistributedDataParallel(cd.convert_sync_bn(Views(), on_cuda=False))
    local = list(xs[:, rank::world])  # the sampler's split: rank r holds global rows r, r+W, ...
    n = ms.BrownianNoise(D, seed=11, device="cpu")(len(local[0]))
    loss, logs = ms.msbreg_loss(model, _target(), local, n, LOSS)
    loss.backward()
    return {"loss": cd.all_reduce_mean(loss.detach()), "l_s": logs["loss_s"].detach(), "noise": n,
            "grads": [p.grad for p in model.parameters()]}


def test_two_process_ddp_singular_value_loss_is_over_the_global_batch():
    xs = torch.randn(K, B, D_IN)
    got = on_processes(_rank_step, xs)
    ref = Views()
    n = ms.BrownianNoise(D, seed=11, device="cpu")(B)
    loss, logs = ms.msbreg_loss(ref, _target(), list(xs), n, LOSS)
    loss.backward()
    # L_s: the same global value on both ranks, equal to one process over all B rows
    for g in got:
        torch.testing.assert_close(g["l_s"], logs["loss_s"].detach(), rtol=1e-5, atol=1e-6)
    # local-batch L_s would differ (the covariance of 8 rows is not the covariance of 16)
    assert abs(ms.singular_value_loss(ref(list(xs[:, 0::2]))[1]).item() - logs["loss_s"].item()) > 1e-3
    # each image's noise is the one-process noise
    torch.testing.assert_close(got[0]["noise"], n[0::2])
    torch.testing.assert_close(got[1]["noise"], n[1::2])
    # the logged loss and the DDP-averaged gradient equal one process's
    assert abs(got[0]["loss"].item() - loss.item()) < 1e-5
    for g, p in zip(got[0]["grads"], ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
