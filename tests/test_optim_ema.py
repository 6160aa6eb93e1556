"""common.optim (LARS, groups, lr rule, schedule) and common.ema (tau schedule, fused update)."""
import copy
import math

import pytest
import torch

from common.config import BASE, Cfg
from common.ema import EMA, tau_at
from common.optim import LARS, build, lr_at, param_groups, scaled_lr


def test_lars_step_matches_hand_computation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    w0, b0 = lin.weight.detach().clone().double(), lin.bias.detach().clone().double()
    lr, m, wd, eta = 0.5, 0.9, 0.01, 0.001
    opt = LARS(param_groups([lin], wd), lr=lr, momentum=m, weight_decay=wd, eta=eta)
    gw, gb = torch.randn(3, 4), torch.randn(3)
    v_w, v_b = torch.zeros_like(w0), torch.zeros_like(b0)
    w, b = w0.clone(), b0.clone()
    for k in range(2):  # two steps: checks the momentum buffer too
        lin.weight.grad, lin.bias.grad = gw.clone() * (k + 1), gb.clone() * (k + 1)
        opt.step()
        g = gw.double() * (k + 1) + wd * w                    # weight decay, then trust ratio
        g = g * (eta * w.norm() / g.norm())
        v_w = m * v_w + g if k else g
        w = w - lr * v_w
        v_b = m * v_b + gb.double() * (k + 1) if k else gb.double()  # bias: plain momentum SGD, no wd
        b = b - lr * v_b
        torch.testing.assert_close(lin.weight.detach().double(), w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(lin.bias.detach().double(), b, rtol=1e-5, atol=1e-7)


def lars_loop_ref(params, grads, bufs, lr, m, wd, eta, exclude):
    """LARS for one parameter at a time, in float64 (the update rule in the module docstring)."""
    out = []
    for w, g, v in zip(params, grads, bufs):
        if not exclude:
            g = g + wd * w
            trust = eta * w.norm() / g.norm() if w.norm() > 0 and g.norm() > 0 else 1.0
            g = g * trust
        v = g if v is None else m * v + g
        out.append((w - lr * v, v))
    return out


@pytest.mark.parametrize("exclude", [False, True])
def test_lars_fused_step_equals_per_parameter_loop(exclude):
    """The fused (foreach) step equals the per-parameter rule over 3 steps, with a zero weight (trust 1),
    a parameter without gradient (untouched) and parameters of different shapes."""
    shapes = [(5, 3, 3, 3), (7, 4), (9,), (2, 2), (3,)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    with torch.no_grad():
        ps[3].zero_()
    idle = torch.nn.Parameter(torch.randn(4))
    lr, m, wd, eta = 0.3, 0.9, 1e-2, 1e-3
    opt = LARS([dict(params=[*ps, idle], weight_decay=wd, lars_exclude=exclude)], lr=lr, momentum=m,
               weight_decay=wd, eta=eta)
    ref_w, ref_v, idle0 = [p.detach().double().clone() for p in ps], [None] * len(ps), idle.detach().clone()
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        ref_w, ref_v = map(list, zip(*lars_loop_ref(ref_w, [g.double() for g in grads], ref_v, lr, m, wd, eta,
                                                   exclude)))
        for p, w in zip(ps, ref_w):
            torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    assert torch.equal(idle.detach(), idle0) and idle not in opt.state


def test_param_groups_exclude_bias_and_norm():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    g = param_groups([net], 1e-4)
    assert [p.shape for p in g[0]["params"]] == [(4, 3, 3, 3), (2, 4)] and g[0]["weight_decay"] == 1e-4
    assert len(g[1]["params"]) == 4 and g[1]["weight_decay"] == 0 and g[1]["lars_exclude"]


def test_lr_scaling_rule_and_optimizers():
    o = Cfg.wrap(copy.deepcopy(BASE["optim"]))
    o.update(lr=0.3, batch_size=512, accum_steps=2, weight_decay=1e-6)
    assert scaled_lr(o) == pytest.approx(0.3 * 1024 / 256)
    assert scaled_lr(o, lr_factor=4) == pytest.approx(0.3 * 1024 / 256 * 4)
    o.lr_scaling = "none"
    assert scaled_lr(o) == 0.3
    lin = torch.nn.Linear(2, 2)
    for name, cls in [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                      ("lars", LARS)]:
        o.name = name
        assert isinstance(build(o, param_groups([lin], 1e-4), 0.1), cls)


def test_warmup_cosine_values():
    total, warm, peak = 1000, 100, 2.0
    assert lr_at(0, total, warm, peak) == 0.0
    assert lr_at(50, total, warm, peak) == pytest.approx(1.0)
    assert lr_at(warm, total, warm, peak) == pytest.approx(peak)          # end of warm-up
    assert lr_at(550, total, warm, peak) == pytest.approx(peak / 2)       # middle of the cosine
    assert lr_at(total, total, warm, peak) == pytest.approx(0.0, abs=1e-12)


def test_tau_schedule():
    assert tau_at(0, 100, 0.99) == pytest.approx(0.99)
    assert tau_at(50, 100, 0.99) == pytest.approx(0.995)
    assert tau_at(100, 100, 0.99) == pytest.approx(1.0)
    assert tau_at(70, 100, 0.996, "constant") == 0.996
    k, K = 30, 100
    assert tau_at(k, K, 0.9) == pytest.approx(1 - 0.1 * (math.cos(math.pi * k / K) + 1) / 2)


def test_ema_update_params_and_buffers():
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(8, 3))  # changes BN running stats
    before = [p.detach().clone() for p in target.parameters()]
    EMA(target, online).update(0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
        assert not t.requires_grad
    for t, o in zip(target.buffers(), online.buffers()):
        assert torch.equal(t, o)
    with pytest.raises(ValueError):
        EMA(torch.nn.Linear(3, 5), torch.nn.Linear(3, 4))
