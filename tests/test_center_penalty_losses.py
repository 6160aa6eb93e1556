"""center_penalty.py pieces vs float64 implementations written from the equations; gradient flow;
the penalty's gradient; ||s|| over the global batch under 2-process Gloo DDP; the predictor's lr."""
import copy
import math

import torch
from gloo import on_processes

from common import dist as cd
from common.config import BASE, Cfg, merge

import center_penalty as cp


def unit(v):
    v = v.detach()
    return v / math.sqrt(sum(float(a) ** 2 for a in v))


def s_ref(z):
    """(CenterVector, Eq. 1) s = 1/(B K) Σ_i Σ_a z_ia/||z_ia||, float64 loops; z [B, K, D]."""
    z = z.double()
    B, K, D = z.shape
    s = [0.0] * D
    for i in range(B):
        for a in range(K):
            u = unit(z[i, a])
            for d in range(D):
                s[d] += float(u[d]) / (B * K)
    return torch.tensor(s, dtype=torch.float64)


def inv_ref(z):
    """(CenterVector, Eq. 2) mean over images i and view pairs a<b of ||z̄_ia - z̄_ib||², float64 loops."""
    z = z.double()
    B, K, _ = z.shape
    vals = [float(((unit(z[i, a]) - unit(z[i, b])) ** 2).sum()) for i in range(B) for a in range(K)
            for b in range(a + 1, K)]
    return sum(vals) / len(vals)


def simsiam_ref(p, z):
    """(CenterVector, Eq. 15) ½[-<p̄_a, z̄_b> - <p̄_b, z̄_a>] averaged over images (K=2); general K: the mean of
    -<p̄_a, z̄_b> over ordered pairs a≠b. float64 loops."""
    p, z = p.double(), z.double()
    B, K, _ = z.shape
    vals = [-float((unit(p[i, a]) * unit(z[i, b])).sum()) for i in range(B) for a in range(K) for b in range(K)
            if a != b]
    return sum(vals) / len(vals)


def test_center_vector_and_its_norm_match_float64():
    for K in (2, 3):
        z = torch.randn(9, K, 6) * 4 + torch.randn(6)  # fresh inputs, a non-zero mean, unequal norms
        s = cp.center_vector(z)
        torch.testing.assert_close(s.double(), s_ref(z), rtol=1e-5, atol=1e-6)
        assert abs(torch.linalg.vector_norm(s).item() - s_ref(z).norm().item()) < 1e-6
    z = torch.randn(1, 1, 5).expand(7, 2, 5) * (torch.rand(7, 2, 1) + 0.1)  # one direction, any norm
    assert abs(cp.center_vector(z).norm().item() - 1) < 1e-6  # full collapse: ||s|| = 1


def test_invariance_simple_and_simsiam_losses_match_float64():
    for K in (2, 4):
        z, p = torch.randn(11, K, 5) * 3, torch.randn(11, K, 5)
        assert abs(cp.invariance_loss(z).item() - inv_ref(z)) < 1e-5
        assert abs(cp.simsiam_loss(p, z).item() - simsiam_ref(p, z)) < 1e-5
        s = cp.center_vector(z)
        want = 0.5 * (inv_ref(z) + s_ref(z).norm().item())  # (Eq. 32) with λ_L = -1
        assert abs(cp.simple_loss(cp.invariance_loss(z), s, -1.0).item() - want) < 1e-5
    z, p = torch.randn(8, 2, 5), torch.randn(8, 2, 5)
    eq15 = sum(0.5 * (-float((unit(p[i, 0].double()) * unit(z[i, 1].double())).sum())
                      - float((unit(p[i, 1].double()) * unit(z[i, 0].double())).sum())) for i in range(8)) / 8
    assert abs(cp.simsiam_loss(p, z).item() - eq15) < 1e-6  # K=2 is exactly Eq. 15
    loss, parts = cp.objective("invariance_only", z, z, cp.center_vector(z), -1.0)
    assert abs(loss.item() - 0.5 * inv_ref(z)) < 1e-6 and set(parts) == {"l_inv"}


def test_penalty_gradient_matches_float64_autograd():
    z = (torch.randn(6, 2, 4) + 0.7).requires_grad_()
    torch.linalg.vector_norm(cp.center_vector(z)).backward()
    z64 = z.detach().double().requires_grad_()
    zn = z64 / z64.norm(dim=-1, keepdim=True)
    zn.mean((0, 1)).norm().backward()  # ||s|| in float64, straight from Eq. 1
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-7)


def test_one_small_step_on_the_penalty_alone_reduces_s():
    z = (torch.randn(32, 2, 8) + 1.0).requires_grad_()  # an off-centre batch: ||s|| well above 0
    s0 = torch.linalg.vector_norm(cp.center_vector(z))
    s0.backward()
    eta = 1.0  # each sample moves by eta x its gradient (which carries the 1/(B K) of the mean)
    with torch.no_grad():
        s1 = torch.linalg.vector_norm(cp.center_vector(z - eta * z.grad))
    predicted = eta * z.grad.pow(2).sum()  # first-order decrease
    assert predicted > 1e-4 and s1 < s0, (s0.item(), s1.item())
    assert abs((s0 - s1) - predicted) < 0.1 * predicted  # the step follows -grad ||s||: s shrinks as predicted
    # the same through a network: one SGD step on ||s|| of its outputs lowers ||s|| on that batch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(64, 2, 3)
    s_before = torch.linalg.vector_norm(cp.center_vector(net(x)))
    s_before.backward()
    torch.optim.SGD(net.parameters(), lr=0.05).step()
    with torch.no_grad():
        assert torch.linalg.vector_norm(cp.center_vector(net(x))) < s_before - 1e-4


def test_gradient_flow_stop_gradient_and_predictor():
    z = torch.randn(5, 2, 6, requires_grad=True)
    p = torch.randn(5, 2, 6, requires_grad=True)
    cp.simsiam_loss(p, z, stop_grad=True).backward()
    assert z.grad is None and p.grad.abs().sum() > 0  # sg(z): nothing flows into the target branch
    p.grad = None
    cp.simsiam_loss(p, z, stop_grad=False).backward()
    assert z.grad.abs().sum() > 0 and p.grad.abs().sum() > 0
    # the centre-penalty objective: no stop-gradient, every view gets gradient from both terms
    z.grad = None
    loss, _ = cp.objective("center_penalty", z, z, cp.center_vector(z), -1.0)
    loss.backward()
    assert (z.grad.flatten(2).norm(dim=-1) > 0).all()


def _model_cfg(variant):
    cfg = Cfg.wrap(merge(BASE, cp.DEFAULTS))
    cfg.loss.variant = variant
    cfg.model.update(width=8, proj_hidden=16, proj_dim=8, pred_hidden=8)
    return cfg


def test_models_per_variant_and_the_predictor_lr():
    x = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    for variant in cp.VARIANTS:
        model = cp.build_model(_model_cfg(variant))
        z, p = model(x)
        assert z.shape == p.shape == (4, 2, 8)
        has_h = variant in ("simsiam", "simsiam_no_stopgrad")
        assert (model.h is not None) == has_h and (p is z) == (not has_h)
    cfg = _model_cfg("simsiam")
    cfg.simsiam.pred_lr_mult = 0.01  # App. B.4: 1% of the predictor lr
    model = cp.build_model(cfg)
    opt = cp.optimizer(cfg, model, peak_lr=0.2)
    cp.set_lrs(opt, 0.1, 0.2, fix_pred_lr=False)
    lrs = {bool(g.get("predictor")): g["lr"] for g in opt.param_groups}
    assert math.isclose(lrs[False], 0.1) and math.isclose(lrs[True], 0.001)
    cp.set_lrs(opt, 0.1, 0.2, fix_pred_lr=True)  # SimSiam: the predictor's lr is not decayed
    lrs = {bool(g.get("predictor")): g["lr"] for g in opt.param_groups}
    assert math.isclose(lrs[False], 0.1) and math.isclose(lrs[True], 0.002)
    pred = {id(q) for q in model.h.parameters()}
    for g in opt.param_groups:
        assert all((id(q) in pred) == bool(g.get("predictor")) for q in g["params"])


# ----------------------------------------------------------------------------- 2 processes (Gloo)
def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))


def _loss(net, x):
    z = net(x.flatten(0, 1)).view(*x.shape[:2], -1)
    s = cp.center_vector(z)
    return cp.simple_loss(cp.invariance_loss(z), s), s


def _rank_step(rank, world, x):
    n = len(x) // world
    net = torch.nn.parallel.DistributedDataParallel(_net())
    loss, s = _loss(net, x[rank * n:(rank + 1) * n])
    loss.backward()
    return {"s": s.detach(), "loss": cd.all_reduce_mean(loss), "grads": [q.grad for q in net.parameters()]}


def test_s_under_two_process_ddp_equals_one_process_on_the_global_batch():
    x = torch.randn(12, 2, 3) + 0.5
    ranks = on_processes(_rank_step, x)
    ref_net = _net()
    ref_loss, ref_s = _loss(ref_net, x)
    ref_loss.backward()
    for got in ranks:
        torch.testing.assert_close(got["s"], ref_s.detach(), rtol=1e-6, atol=1e-7)  # every rank: the global s
        assert abs(got["loss"].item() - ref_loss.item()) < 1e-6
        for g, q in zip(got["grads"], ref_net.parameters()):
            torch.testing.assert_close(g, q.grad, rtol=1e-5, atol=1e-7)
    z_ref = copy.deepcopy(ref_net)(x.flatten(0, 1)).view(12, 2, -1)
    assert abs(ref_s.norm().item() - s_ref(z_ref).norm().item()) < 1e-6
