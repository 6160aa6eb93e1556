"""decorr_nostopgrad.py: Eq. 18 and Eq. 17/19 against float64 implementations written from the equations
(fresh random inputs each run), the W_p = I identity, and the gradient flow (no stop-gradient / stopgrad)."""
import copy
import math

import pytest
import torch

from common.config import BASE, Cfg

import decorr_nostopgrad as dn


# ----------------------------------------------------------------------------- float64 references
def standardize_ref(z):
    """(Decorr, Eq. 18) f̄_j = (f_j - μ)/σ, μ = 1/n Σ f_j, σ² = 1/(n-1) Σ (f_j - μ)², per dimension; loops."""
    z = z.double()
    n, d = z.shape
    out = torch.empty_like(z)
    for c in range(d):
        mu = sum(float(z[j, c]) for j in range(n)) / n
        sigma = math.sqrt(sum((float(z[j, c]) - mu) ** 2 for j in range(n)) / (n - 1))
        for j in range(n):
            out[j, c] = (float(z[j, c]) - mu) / sigma
    return out


def F_of(fbar):
    """F = [f̄_1, ..., f̄_n] / √n, a d x n matrix (§3.1, §4.2)."""
    return fbar.double().T / math.sqrt(fbar.shape[0])


def partitions_ref(F, k):
    """F = (1/√k)[F_1, ..., F_k] (§4.4), partition i holding the samples j with j mod k = i."""
    n = F.shape[1]
    return [math.sqrt(k) * F[:, [j for j in range(n) if j % k == i]] for i in range(k)]


def eq19_ref(F1, F2, W, k, c_inv, c_cov):
    """(Decorr, Eq. 19) one direction F¹ -> F², written literally with d x d matrices."""
    d = F1.shape[0]
    inv = ((W @ F1 - F2) ** 2).sum()
    cov = sum(((W.T @ W - W @ (Fi @ Fi.T) @ W.T) ** 2).sum() for Fi in partitions_ref(F1, k))
    return c_inv * inv + c_cov / d * cov


def eq17_ref(F1, F2, W, c_inv, c_cov):
    """(Decorr, Eq. 17) one direction F¹ -> F², no partitions."""
    d = F1.shape[0]
    return c_inv * ((W @ F1 - F2) ** 2).sum() + c_cov / d * ((W.T @ W - W @ (F1 @ F1.T) @ W.T) ** 2).sum()


def fresh(n, d):
    """Fresh random projector outputs with a different mean and scale per dimension, and a random W_p."""
    z = torch.randn(n, d) * (0.5 + 3 * torch.rand(d)) + 2 * torch.randn(d)
    return z, torch.randn(d, d) / math.sqrt(d)


def ours(z1, z2, W, k, c_inv, c_cov, **kw):
    inv, cov = dn.decorr_loss(dn.standardize(z1, eps=0.0), dn.standardize(z2, eps=0.0), W, None, k, c_inv, c_cov,
                              **kw)
    return (inv + cov).double()


# ----------------------------------------------------------------------------- Eq. 18
def test_standardize_matches_eq18_zero_mean_unit_unbiased_variance():
    z, _ = fresh(24, 7)
    f = dn.standardize(z, eps=0.0)
    torch.testing.assert_close(f.double(), standardize_ref(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.mean(0), torch.zeros(7), rtol=0, atol=1e-5)
    torch.testing.assert_close(f.var(0, unbiased=True), torch.ones(7), rtol=1e-5, atol=1e-5)  # 1/(n-1)
    fb = dn.standardize(z, eps=0.0, unbiased=False)  # the authors' code (BatchNorm): biased variance
    torch.testing.assert_close(fb.var(0, unbiased=False), torch.ones(7), rtol=1e-5, atol=1e-5)
    # the default eps only guards constant dimensions: a constant column maps to 0, not NaN
    zc = torch.cat([z, torch.full((24, 1), 3.0)], 1)
    assert torch.isfinite(dn.standardize(zc)).all() and dn.standardize(zc)[:, -1].abs().max() == 0


# ----------------------------------------------------------------------------- Eq. 19 / Eq. 17
@pytest.mark.parametrize("k", [1, 2, 4])
def test_loss_matches_float64_eq19_both_directions(k):
    n, d = 16, 6
    z1, W = fresh(n, d)
    z2 = z1 + 0.5 * torch.randn(n, d)
    c_inv, c_cov = 0.5 + 30 * torch.rand(1).item(), 0.5 + 10 * torch.rand(1).item()
    F1, F2 = F_of(standardize_ref(z1)), F_of(standardize_ref(z2))
    Wd = W.double()
    ref = eq19_ref(F1, F2, Wd, k, c_inv, c_cov) + eq19_ref(F2, F1, Wd, k, c_inv, c_cov)  # symmetric (§4.2)
    torch.testing.assert_close(ours(z1, z2, W, k, c_inv, c_cov), ref, rtol=2e-5, atol=1e-4)
    # each direction on its own is the one-way Eq. 19 (and the order of the views matters)
    inv, cov = dn.direction_loss(dn.standardize(z1, eps=0.0), dn.standardize(z2, eps=0.0), W, None, k)
    torch.testing.assert_close((c_inv * inv + c_cov / d * cov).double(), eq19_ref(F1, F2, Wd, k, c_inv, c_cov),
                               rtol=2e-5, atol=1e-4)
    assert not torch.isclose(eq19_ref(F1, F2, Wd, k, c_inv, c_cov), eq19_ref(F2, F1, Wd, k, c_inv, c_cov))


@pytest.mark.parametrize("n,d,k", [(24, 16, 3), (24, 4, 2), (32, 8, 4)])  # n' = 8 < d: expanded; n' >= d: direct
def test_correlation_term_value_and_gradients_match_float64_literal(n, d, k):
    """Σ_i ||W_pᵀW_p - (1/n') Σ_{j ≡ i mod k} p_j p_jᵀ||_F², written with d x d matrices and loops in float64,
    against correlation_term on both of its paths (expanded square, direct difference) and against the script's
    literal form (correlation_term_literal): value and gradients."""
    p = (torch.randn(n, d) * (0.5 + torch.rand(d))).requires_grad_()
    W = (torch.randn(d, d) / math.sqrt(d)).requires_grad_()
    got = dn.correlation_term(p, W, k)
    got.backward()
    pd, Wd = p.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = sum(((Wd.T @ Wd - sum(torch.outer(pd[j], pd[j]) for j in range(i, n, k)) / (n // k)) ** 2).sum()
              for i in range(k))
    ref.backward()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(p.grad.double(), pd.grad, rtol=1e-4, atol=1e-4 * pd.grad.abs().max().item())
    torch.testing.assert_close(W.grad.double(), Wd.grad, rtol=1e-4, atol=1e-4 * Wd.grad.abs().max().item())
    pl, Wl = p.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    lit = dn.correlation_term_literal(pl, Wl, k)  # the script's slow form of Eq. 19 is the same function
    lit.backward()
    torch.testing.assert_close(lit, ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close((pl.grad, Wl.grad), (pd.grad, Wd.grad), rtol=1e-10, atol=1e-10)
    # the shared ||W_pᵀW_p||² (decorr_loss computes it once per step) gives the same value
    torch.testing.assert_close(dn.correlation_term(p, W, k, (W.T @ W).pow(2).sum()), got)


def test_gram_sq_value_and_gradient_match_float64():
    """||W_pᵀW_p||_F² and its gradient 4 W_p W_pᵀW_p (two products and a detach trick) against autograd in float64."""
    W = (torch.randn(12, 12) / 3).requires_grad_()
    got = dn.gram_sq(W)
    got.backward()
    Wd = W.detach().double().requires_grad_()
    ref = ((Wd.T @ Wd) ** 2).sum()
    ref.backward()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(W.grad.double(), Wd.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(W.grad.double(), 4 * Wd @ Wd.T @ Wd, rtol=1e-4, atol=1e-5, check_dtype=False)


def test_one_partition_is_eq17_and_partitions_change_the_loss():
    n, d = 20, 5
    z1, W = fresh(n, d)
    z2 = z1 + torch.randn(n, d)
    F1, F2 = F_of(standardize_ref(z1)), F_of(standardize_ref(z2))
    ref17 = eq17_ref(F1, F2, W.double(), 3.0, 2.0) + eq17_ref(F2, F1, W.double(), 3.0, 2.0)
    torch.testing.assert_close(ours(z1, z2, W, 1, 3.0, 2.0), ref17, rtol=2e-5, atol=1e-4)
    assert abs(ours(z1, z2, W, 4, 3.0, 2.0) - ref17) > 1e-2 * ref17  # k = 4 is a different objective


def test_partitions_recompose_F_and_partition_sums_equal_eq19():
    """F = (1/√k)[F_1..F_k]: (1/k) Σ F_iF_iᵀ = FFᵀ; correlation_term's sum over partitions = Eq. 19's."""
    n, d, k = 24, 5, 3
    z, W = fresh(n, d)
    F = F_of(standardize_ref(z))
    parts = partitions_ref(F, k)
    torch.testing.assert_close(sum(Fi @ Fi.T for Fi in parts) / k, F @ F.T)
    cols = torch.cat([torch.arange(i, n, k) for i in range(k)])
    torch.testing.assert_close(torch.cat(parts, 1) / math.sqrt(k), F[:, cols])
    Wd = W.double()
    each = [((Wd.T @ Wd - Wd @ (Fi @ Fi.T) @ Wd.T) ** 2).sum() for Fi in parts]
    p = dn.standardize(z, eps=0.0) @ W.T
    torch.testing.assert_close(dn.correlation_term(p, W, k).double(), sum(each), rtol=2e-5, atol=1e-4)
    for i in range(k):  # partition i alone: the rows j ≡ i (mod k)
        torch.testing.assert_close(dn.correlation_term(p[i::k], W, 1).double(), each[i], rtol=2e-5, atol=1e-4)


def test_predictor_bias_uses_predictions_as_the_authors_code():
    """With a bias b the correlation term is built from the predictions W_p f̄ + b (per-sample form)."""
    n, d, k = 12, 4, 2
    z1, W = fresh(n, d)
    z2, b = z1 + torch.randn(n, d), torch.randn(d)
    f1, f2 = standardize_ref(z1), standardize_ref(z2)
    Wd, bd = W.double(), b.double()
    inv = sum(((Wd @ f1[j] + bd - f2[j]) ** 2).sum() for j in range(n)) / n
    cov = 0
    for i in range(k):
        rows = [Wd @ f1[j] + bd for j in range(i, n, k)]
        S = sum(torch.outer(r, r) for r in rows) / len(rows)
        cov = cov + ((Wd.T @ Wd - S) ** 2).sum()
    got = dn.direction_loss(f1.float(), f2.float(), W, b, k)
    torch.testing.assert_close(torch.stack(got).double(), torch.stack([inv, cov]), rtol=2e-5, atol=1e-4)
    i1, _ = dn.decorr_loss(f1.float(), f2.float(), W, b, k, 1.0, 1.0, inv_norm="mse")  # authors': / d
    i2, _ = dn.decorr_loss(f1.float(), f2.float(), W, b, k, 1.0, 1.0)
    torch.testing.assert_close(i1 * d, i2)


def test_identity_predictor_correlation_term_is_correlation_matrix_distance():
    """Derivation: with W_p = I and k = 1, FFᵀ = (1/n) Σ f̄f̄ᵀ = ((n-1)/n) R, R the Pearson correlation
    matrix (Eq. 18 divides by the unbiased σ). So c_cov/d ||WᵀW - W FFᵀ Wᵀ||² = c_cov/d ||(n-1)/n R - I||²
    = c_cov/d (||FᵀF||² - 2 d (n-1)/n + d)   (tr FFᵀ = ||F||² = d(n-1)/n; ||FFᵀ||_F = ||FᵀF||_F).
    With k partitions: Σ_i ||(1/n') Σ_{j in i} f̄_j f̄_jᵀ - I||²."""
    n, d = 30, 6
    z1, _ = fresh(n, d)
    z2 = z1 + 0.3 * torch.randn(n, d)
    I = torch.eye(d)
    f1, f2 = dn.standardize(z1, eps=0.0), dn.standardize(z2, eps=0.0)
    _, cov = dn.direction_loss(f1, f2, I, None, 1)
    R = torch.corrcoef(z1.double().T)
    torch.testing.assert_close(cov.double(), (((n - 1) / n * R - torch.eye(d, dtype=torch.float64)) ** 2).sum(),
                               rtol=1e-5, atol=1e-5)
    F = F_of(f1)
    torch.testing.assert_close(cov.double(), ((F.T @ F) ** 2).sum() - 2 * d * (n - 1) / n + d, rtol=1e-5, atol=1e-5)
    _, cov3 = dn.direction_loss(f1, f2, I, None, 3)
    fd = f1.double()
    ref3 = sum(((fd[i::3].T @ fd[i::3] / (n // 3) - torch.eye(d, dtype=torch.float64)) ** 2).sum() for i in range(3))
    torch.testing.assert_close(cov3.double(), ref3, rtol=1e-5, atol=1e-5)
    # and the invariance term is then ||F¹ - F²||² = mean_j ||f̄¹_j - f̄²_j||²
    inv, _ = dn.direction_loss(f1, f2, I, None, 1)
    torch.testing.assert_close(inv, (f1 - f2).pow(2).sum(1).mean())


# ----------------------------------------------------------------------------- gradient flow
def small_model(identity=False, bias=False, proj_bias=False):
    m = Cfg.wrap(copy.deepcopy({**BASE["model"], **dn.DEFAULTS["model"]}))
    m.update(arch="resnet18", cifar_stem=True, width=8, proj_hidden=16, proj_dim=8, proj_layers=3,
             predictor_bias=bias, zero_init_residual=False, proj_bias=proj_bias)
    return dn.Decorr(m, identity)


def forward(model, stopgrad, both=True):
    x1, x2 = torch.randn(8, 3, 16, 16, requires_grad=True), torch.randn(8, 3, 16, 16, requires_grad=True)
    z1, z2 = model([x1, x2])
    z1.retain_grad(), z2.retain_grad()
    f1, f2 = dn.standardize(z1), dn.standardize(z2)
    W, b = model.predictor()
    if both:
        inv, cov = dn.decorr_loss(f1, f2, W, b, 2, 25.0, 1.0, stopgrad=stopgrad)
        loss = inv + cov
    else:  # one direction F¹ -> F² (the predicted branch is view 1)
        inv, cov = dn.direction_loss(f1, f2, W, b, 2, stopgrad=stopgrad)
        loss = 25.0 * inv + cov / 8
    loss.backward()
    return x1, x2, z1, z2


def test_no_stopgrad_both_views_and_every_parameter_get_gradient():
    torch.manual_seed(0)
    model = small_model(bias=True)
    x1, x2, _, _ = forward(model, stopgrad=False, both=False)  # even one direction reaches both views
    assert x1.grad.abs().sum() > 0 and x2.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), \
        [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert model.W_p.bias is not None and model.g[6].bias is None  # projector Linears have no bias by default
    # with model.proj_bias, the last projector bias is removed by the standardisation (Eq. 18): ~0 gradient
    model = small_model(proj_bias=True)
    forward(model, stopgrad=False)
    assert model.g[6].bias.grad.abs().max() < 1e-3 * model.g[6].weight.grad.abs().max()


def test_stopgrad_only_the_predicted_branch_gets_gradient():
    torch.manual_seed(0)
    model = small_model()
    x1, x2, z1, z2 = forward(model, stopgrad=True, both=False)
    assert x1.grad.abs().sum() > 0 and z1.grad.abs().sum() > 0
    assert x2.grad is None and z2.grad is None  # F² is a constant of this direction
    assert model.W_p.weight.grad.abs().sum() > 0
    # symmetric with stopgrad: view 1 gets exactly the gradient of the direction in which it is predicted
    torch.manual_seed(1)
    model = small_model()
    _, _, z1_sym, _ = forward(model, stopgrad=True, both=True)
    torch.manual_seed(1)
    model1 = small_model()
    _, _, z1_one, _ = forward(model1, stopgrad=True, both=False)
    torch.testing.assert_close(z1_sym.grad, z1_one.grad, rtol=1e-5, atol=1e-9)
    torch.manual_seed(1)
    model2 = small_model()
    _, _, z1_nosg, _ = forward(model2, stopgrad=False, both=True)
    assert not torch.allclose(z1_nosg.grad, z1_one.grad, rtol=1e-3, atol=1e-9)  # no stopgrad: both directions


def test_identity_predictor_has_no_parameters_and_is_the_identity():
    model = small_model(identity=True)
    assert model.W_p is None and not any("W_p" in n for n, _ in model.named_parameters())
    W, b = model.predictor()
    assert torch.equal(W, torch.eye(8)) and b is None


def test_predictor_diagnostics_symmetry_and_eigenvalues():
    d = 12
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    lam = torch.cat([torch.full((8,), 2.0), torch.zeros(4)])
    W = (Q * lam) @ Q.T  # symmetric, eigenvalues 2 (x8) and 0 (x4): the end state Fig. 4 shows
    m, ev = dn.predictor_diagnostics(W)
    assert m["wp_asym"] < 1e-12 and abs(m["wp_eig_re_max"] - 2) < 1e-9 and m["wp_eig_im_max"] < 1e-9
    assert abs(m["wp_eig_small_frac"] - 4 / 12) < 1e-12 and m["wp_eig_cv"] < 1e-9 and len(ev) == d
    A = torch.randn(d, d, dtype=torch.float64)
    m, _ = dn.predictor_diagnostics(A - A.T)  # antisymmetric: ||W - Wᵀ|| / ||W|| = 2
    assert abs(m["wp_asym"] - 2) < 1e-9
    m, _ = dn.predictor_diagnostics(torch.zeros(d, d))  # a collapsed W_p = O: finite numbers, no crash
    assert all(v == v for v in m.values()) and m["wp_asym"] == 0


def corr_dist_ref(f):
    """||Σ - I||_F² with Σ the correlation matrix of the dims of f [N, D] over the rows, float64 loops (Fig. 1)."""
    f = f.double()
    n, d = f.shape
    mu = [sum(float(f[j, c]) for j in range(n)) / n for c in range(d)]
    sd = [math.sqrt(sum((float(f[j, c]) - mu[c]) ** 2 for j in range(n)) / (n - 1)) for c in range(d)]
    out = 0.0
    for a in range(d):
        for b in range(d):
            cov = sum((float(f[j, a]) - mu[a]) * (float(f[j, b]) - mu[b]) for j in range(n)) / (n - 1)
            out += (cov / (sd[a] * sd[b]) - (a == b)) ** 2
    return out


def test_fig1_correlation_distance_is_taken_on_the_projector_outputs():
    """§5.2: Fig. 1's Σ is the auto-correlation of the "extracted features (i.e., f_i^1's)", the projector outputs
    (§3.1): ``corr_dist_proj`` = ||Σ - I||² of g(backbone features) in eval mode; monitor's ``corr_dist`` is the
    backbone's."""
    torch.manual_seed(0)
    model = small_model()
    model.train()([torch.randn(64, 3, 16, 16)])  # BN running statistics that differ from their initial values
    feats = torch.randn(40, model.g[0].in_features) * torch.rand(model.g[0].in_features) + 1
    diag = dn.representation_diagnostics(model, feats)
    model.eval()
    with torch.no_grad():
        z = model.g(feats)
    assert model.g.training is False
    assert abs(diag["corr_dist_proj"] - corr_dist_ref(z)) < 1e-5 * corr_dist_ref(z)  # (correlation_distance: eps 1e-8)
    assert abs(diag["corr_dist_proj"] - corr_dist_ref(feats)) > 1e-3  # not the backbone's
