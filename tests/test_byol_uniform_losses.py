"""byol_uniform.py losses vs float64 implementations written from the equations; gradient flow."""
import copy
import itertools
import math

import torch

from common.config import BASE, Cfg

import byol_uniform as bu


def byol_ref(p, z):
    """(BYOL-MHE, Eq. 5) ||p/||p|| - z/||z||||² per sample, float64 loops."""
    out = []
    for pi, zi in zip(p.double(), z.double()):
        pn = pi / math.sqrt(sum(float(v) ** 2 for v in pi))
        zn = zi / math.sqrt(sum(float(v) ** 2 for v in zi))
        out.append(sum((float(a) - float(b)) ** 2 for a, b in zip(pn, zn)))
    return torch.tensor(out, dtype=torch.float64)


def uniformity_ref(z, t):
    """(BYOL-MHE, Eq. 3) log( 1/(n(n-1)) Σ_{i≠j} exp(-t ||ẑ_i - ẑ_j||²) ), float64 double loop."""
    z = z.double()
    zn = [zi / zi.norm() for zi in z]
    n = len(zn)
    total = sum(math.exp(-t * float(((zn[i] - zn[j]) ** 2).sum())) for i, j in itertools.permutations(range(n), 2))
    return math.log(total / (n * (n - 1)))


def test_byol_loss_matches_float64_reference():
    p, z = torch.randn(17, 12) * 3, torch.randn(17, 12)  # fresh random inputs each run
    torch.testing.assert_close(bu.byol_loss(p, z).double(), byol_ref(p, z), rtol=1e-5, atol=1e-5)
    assert torch.allclose(bu.byol_loss(z, 5 * z), torch.zeros(17), atol=1e-6)  # scale-invariant, 0 when aligned


def test_uniformity_matches_float64_reference_all_pairs():
    for t in (2.0, 0.7):
        z = torch.randn(23, 8)
        assert abs(bu.uniformity_loss(z, t).item() - uniformity_ref(z, t)) < 1e-5
    # all pairs i≠j of the batch: moving one sample changes the loss through every pair it is in
    z = torch.randn(10, 4, requires_grad=True)
    bu.uniformity_loss(z).backward()
    assert (z.grad.norm(dim=1) > 0).all()


def test_gradient_flow_target_gets_none_and_uniformity_skips_predictor():
    cfg = Cfg.wrap(copy.deepcopy(BASE["model"]))
    cfg.update(width=8, proj_hidden=16, proj_dim=8, pred_hidden=16)
    online = bu.Online(cfg)
    target = copy.deepcopy(torch.nn.Sequential(online.f, online.g))
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    (z1, z2), (p1, p2) = online([x1, x2])
    t1, t2 = target(x1), target(x2)  # built with grad enabled on purpose: the loss must still detach
    loss = (bu.byol_loss(p1, t2) + bu.byol_loss(p2, t1)).mean()
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in online.parameters())
    # the uniformity term (Eq. 7 on projections z) sends no gradient into the predictor q
    online.zero_grad(set_to_none=True)
    (z1, z2), _ = online([x1, x2])
    ((bu.uniformity_loss(z1) + bu.uniformity_loss(z2)) / 2).backward()
    assert all(p.grad is None for p in online.q.parameters())
    assert all(p.grad is not None for p in online.g.parameters())
