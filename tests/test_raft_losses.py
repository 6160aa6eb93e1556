"""raft.py losses vs float64 implementations of Alg. 1 lines 7-8 and Eq. 4, the tangential variant, gradient
flow of every predictor / objective variant, and Theorem 5.1 (BYOL′ from (θ, W) = RAFT from (θ, -W))."""
import copy
import math

import pytest
import torch

from common.config import BASE, Cfg, merge

import raft


def net(m):
    """raft.py's online network: BYOL's f, g with the q_w of ``model.predictor``."""
    return raft.Online(m, raft.predictor)

def unit_ref(v):
    n = math.sqrt(sum(float(a) ** 2 for a in v))
    return [float(a) / n for a in v]


def sqdist_ref(a, b):
    return sum((x - y) ** 2 for x, y in zip(unit_ref(a), unit_ref(b)))


def line7_ref(z1, z2):
    """Alg. 1 line 7: l_i = || z1/||z1|| - z2/||z2|| ||², float64 loops."""
    return torch.tensor([sqdist_ref(a, b) for a, b in zip(z1.double(), z2.double())], dtype=torch.float64)


def line8_ref(z1, z2, t1, t2):
    """Alg. 1 line 8: l'_i = -½ (||ẑ1 - ẑ'1||² + ||ẑ2 - ẑ'2||²), same view against the MT, float64 loops."""
    return torch.tensor([-0.5 * (sqdist_ref(a, c) + sqdist_ref(b, d))
                         for a, b, c, d in zip(z1.double(), z2.double(), t1.double(), t2.double())],
                        dtype=torch.float64)


def byol_ref(p1, p2, t1, t2):
    """Eq. 4 symmetrised: ½(||p̂1 - ẑ'2||² + ||p̂2 - ẑ'1||²), cross views, float64 loops."""
    return torch.tensor([0.5 * (sqdist_ref(a, d) + sqdist_ref(b, c))
                         for a, b, c, d in zip(p1.double(), p2.double(), t1.double(), t2.double())],
                        dtype=torch.float64)


def fresh(n=13, d=9):
    return [torch.randn(n, d) * s for s in (1.0, 3.0, 0.5, 2.0)]  # fresh random inputs each run


def lc(objective, alpha=1.0, beta=1.0, tangential=False):
    return Cfg.wrap(dict(objective=objective, alpha=alpha, beta=beta, tangential=tangential))


# ------------------------------------------------------------------------------------------- values
def test_alignment_and_cross_model_match_alg1_lines_7_and_8():
    z1, z2, t1, t2 = fresh()
    torch.testing.assert_close(raft.alignment_loss(z1, z2).double(), line7_ref(z1, z2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(-raft.cross_model_loss(z1, z2, t1, t2).double(), line8_ref(z1, z2, t1, t2),
                               rtol=1e-5, atol=1e-6)
    # scale invariance and zero on aligned pairs: the outputs live on the hypersphere
    assert torch.allclose(raft.alignment_loss(z1, 7 * z1), torch.zeros(len(z1)), atol=1e-6)


def test_objectives_match_eq_4_10_11_and_tab3_sign():
    z1, z2, t1, t2 = fresh()
    a, b = 0.7, 2.5
    align, line8 = line7_ref(z1, z2), line8_ref(z1, z2, t1, t2)  # line8 = -cross
    # RAFT (Eq. 11) = α·align - β·cross = α·(line 7) + β·(line 8); with α = β = 1 exactly Alg. 1 line 10's sum
    raft_val = raft.objective(lc("raft", a, b), z1, z2, t1, t2).double()
    torch.testing.assert_close(raft_val, (a * align + b * line8).mean(), rtol=1e-5, atol=1e-6)
    # BYOL′ (Eq. 10) = α·align + β·cross
    prime = raft.objective(lc("byol_prime", a, b), z1, z2, t1, t2).double()
    torch.testing.assert_close(prime, (a * align - b * line8).mean(), rtol=1e-5, atol=1e-6)
    # Tab. 3 writes L = α L_align + β_tab3 L_cross with β_tab3 = -1 for RAFT: SIGN maps our β to it
    assert raft.SIGN["raft"] * 1.0 == -1.0 and raft.SIGN["byol_prime"] * 1.0 == 1.0
    # BYOL (Eq. 4): cross views, α and β play no part
    byol = raft.objective(lc("byol", 5.0, 9.0), z1, z2, t1, t2).double()
    torch.testing.assert_close(byol, byol_ref(z1, z2, t1, t2).mean(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- tangential
def test_tangential_gradient_is_orthogonal_and_is_the_projected_plain_gradient():
    n, d = 11, 7
    p_hat = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).requires_grad_()
    z_hat = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    z_hat[0] = -z_hat[0].abs() * torch.sign(p_hat[0].detach())  # one pair with λ < 0: the formula still holds
    (g_tan,) = torch.autograd.grad(raft.sphere_distance(p_hat, z_hat, tangential=True).sum(), p_hat)
    (g_plain,) = torch.autograd.grad(raft.sphere_distance(p_hat, z_hat).sum(), p_hat)
    p = p_hat.detach()
    assert (g_tan * p).sum(1).abs().max() < 1e-6  # orthogonal to the normalised online output
    assert (g_plain * p).sum(1).abs().max() > 1e-2  # the plain gradient is not (so the check has teeth)
    projected = g_plain - (g_plain * p).sum(1, keepdim=True) * p  # (I - p̂p̂ᵀ) g
    torch.testing.assert_close(g_tan, projected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_tan, -2 * (z_hat - (p * z_hat).sum(1, keepdim=True) * p))  # §5 Remark


def test_tangential_does_not_change_parameter_gradients_through_the_normalisation():
    """p̂ = p/||p|| in the graph already projects out the normal part: same gradient w.r.t. the raw output."""
    p = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    q, t1, t2 = torch.randn(10, 6, dtype=torch.float64, requires_grad=True), torch.randn(10, 6), torch.randn(10, 6)
    for obj in ("byol", "byol_prime", "raft"):
        g = [torch.autograd.grad(raft.objective(lc(obj, tangential=tan), p, q, t1.double(), t2.double()), (p, q))
             for tan in (False, True)]
        for a, b in zip(*g):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------- gradient flow
def model_cfg(predictor="mlp", **kw):
    m = Cfg.wrap(merge(BASE["model"], raft.DEFAULTS["model"]))
    m.update(width=4, proj_hidden=16, proj_dim=8, pred_hidden=16, predictor=predictor, **kw)
    return m


@pytest.mark.parametrize("predictor", ["mlp", "linear", "linear_identity_init", "none"])
@pytest.mark.parametrize("objective", ["byol", "byol_prime", "raft"])
def test_gradient_flow_target_gets_none_online_gets_all(predictor, objective):
    torch.manual_seed(0)
    online = net(model_cfg(predictor))
    target = copy.deepcopy(torch.nn.Sequential(online.f, online.g))
    x1, x2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    _, (p1, p2) = online([x1, x2])
    t1, t2 = target(x1), target(x2)  # built with grad enabled on purpose: the losses must detach the MT
    raft.objective(lc(objective), p1, p2, t1, t2).backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online.parameters())


def test_predictor_variants():
    assert isinstance(net(model_cfg("none")).q, torch.nn.Identity)  # q_w = I (-NP)
    lpi = net(model_cfg("linear_identity_init")).q
    assert lpi.bias is None and torch.equal(lpi.weight, torch.eye(8))  # -LPI starts at W = I
    lp = net(model_cfg("linear")).q
    assert lp.bias is None and not torch.allclose(lp.weight, torch.eye(8))  # -LP: random W, q_w(·) = W(·)
    mlpp = net(model_cfg("mlp")).q
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in mlpp.modules())  # App. B: no BN in q_w
    assert [m.out_features for m in mlpp if isinstance(m, torch.nn.Linear)] == [16, 8]
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net(model_cfg("mlp", pred_norm="bn")).q.modules())


def test_no_predictor_alignment_reaches_encoder_through_both_views():
    torch.manual_seed(1)
    online = net(model_cfg("none"))
    x1 = torch.randn(6, 3, 8, 8, requires_grad=True)
    x2 = torch.randn(6, 3, 8, 8, requires_grad=True)
    (z1, z2), (p1, p2) = online([x1, x2])
    assert p1 is z1  # no predictor: the alignment acts on the projections themselves
    raft.alignment_loss(p1, p2).mean().backward()
    assert x1.grad.abs().sum() > 0 and x2.grad.abs().sum() > 0  # both branches carry gradient
    # the encoder's gradient is the sum of the two views' contributions, and neither is zero
    per_view = []
    for keep in (0, 1):
        online.zero_grad()
        (_, _), (q1, q2) = online([x1.detach(), x2.detach()])
        pair = (q1, q2.detach()) if keep == 0 else (q1.detach(), q2)
        raft.alignment_loss(*pair).mean().backward()
        per_view.append(torch.cat([p.grad.flatten() for p in online.f.parameters()]))
    assert per_view[0].norm() > 0 and per_view[1].norm() > 0


def test_cross_model_uses_same_view_byol_the_other_view():
    p1, p2, t1, t2 = [torch.randn(5, 4, requires_grad=i < 2) for i in range(4)]
    g = torch.autograd.grad(raft.cross_model_loss(p1, p2, t1, t2).sum(), p1)[0]
    assert torch.equal(g, torch.autograd.grad(raft.cross_model_loss(p1, p2, t1, torch.randn(5, 4)).sum(), p1)[0])
    g = torch.autograd.grad(raft.byol_loss(p1, p2, t1, t2).sum(), p1)[0]
    assert torch.equal(g, torch.autograd.grad(raft.byol_loss(p1, p2, torch.randn(5, 4), t2).sum(), p1)[0])


# ------------------------------------------------------------------------------------------- Theorem 5.1
def _steps(objective, w_sign, tangential, state, x, steps, opt_name):
    """Run ``steps`` optimizer + EMA steps from ``state`` with q_w = w_sign·W; returns (online, W)."""
    torch.manual_seed(0)
    online = net(model_cfg("linear")).double()
    online.load_state_dict(state)
    with torch.no_grad():
        online.q.weight.mul_(w_sign)
    target = copy.deepcopy(torch.nn.Sequential(online.f, online.g))
    ema = raft.EMA(target, torch.nn.Sequential(online.f, online.g))
    opt = (torch.optim.SGD(online.parameters(), lr=0.05) if opt_name == "sgd"
           else torch.optim.Adam(online.parameters(), lr=1e-2))
    for k in range(steps):
        x1, x2 = x[k]
        _, (p1, p2) = online([x1, x2])
        with torch.no_grad():
            t1, t2 = target(x1), target(x2)
        opt.zero_grad()
        raft.objective(lc(objective, tangential=tangential), p1, p2, t1, t2).backward()
        opt.step()
        ema.update(0.9)
    return online


@pytest.mark.parametrize("tangential", [True, False])
@pytest.mark.parametrize("opt_name,steps", [("sgd", 1), ("adam", 3)])
def test_theorem_5_1_byol_prime_from_W_equals_raft_from_minus_W(tangential, opt_name, steps):
    """(RAFT, Theorem 5.1 / App. G) linear predictor, hypersphere outputs (tangential gradients):
    BYOL′ from (θ, W) and RAFT from (θ, -W) take the same encoder steps and keep W_RAFT = -W_BYOL′.
    Float64; absolute tolerance on every parameter 1e-10 after SGD, 1e-9 after Adam (Adam divides the
    round-off-level gradient of the projector's bias before BN, zero in exact arithmetic, by eps = 1e-8)."""
    torch.manual_seed(2)
    state = net(model_cfg("linear")).double().state_dict()
    x = [(torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randn(8, 3, 8, 8, dtype=torch.float64))
         for _ in range(steps)]
    prime = _steps("byol_prime", +1, tangential, state, x, steps, opt_name)
    raft_net = _steps("raft", -1, tangential, state, x, steps, opt_name)
    enc_p = torch.cat([p.flatten() for p in torch.nn.Sequential(prime.f, prime.g).parameters()])
    enc_r = torch.cat([p.flatten() for p in torch.nn.Sequential(raft_net.f, raft_net.g).parameters()])
    enc_0 = torch.cat([v.flatten() for k, v in state.items() if k.startswith(("f.", "g.")) and v.is_floating_point()
                       and "running" not in k])
    assert (enc_p - enc_0).abs().max() > 1e-4  # the encoder did move
    tol = 1e-10 if opt_name == "sgd" else 1e-9
    torch.testing.assert_close(enc_r, enc_p, rtol=0, atol=tol)
    torch.testing.assert_close(raft_net.q.weight, -prime.q.weight, rtol=0, atol=tol)
    # control: RAFT from (θ, +W) does not follow BYOL′ (the correspondence needs the sign flip)
    same_sign = _steps("raft", +1, tangential, state, x, steps, opt_name)
    enc_s = torch.cat([p.flatten() for p in torch.nn.Sequential(same_sign.f, same_sign.g).parameters()])
    assert (enc_s - enc_p).abs().max() > 1e-6
