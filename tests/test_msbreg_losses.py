"""msbreg.py losses vs float64 loop implementations written from the paper's equations; gradient flow;
the Brownian noise stream (shared by the views of an image, fresh per step, independent of the process
count); the exact K = 2 relation between the centroid loss (Eq. 3) and BYOL's loss (Eq. 1)."""
import copy
import math

import pytest
import torch

from common.config import BASE, Cfg
from common.evaluate import extract_features
from common.loaders import ResumableSampler

import msbreg as ms


def _unit(v):
    return v / math.sqrt(sum(float(a) ** 2 for a in v))


def _sq(a, b):
    return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))


def centroid_ref(p, z):
    """(MSBReg, Eq. 3) per image i: 1/K Σ_j ||p̂_ij - 1/K Σ_l ẑ'_il||², float64 loops. p, z: [K, B, d]."""
    p, z = p.double(), z.double()
    K, B, _ = p.shape
    out = []
    for i in range(B):
        zs = [_unit(z[l, i]) for l in range(K)]
        c = [sum(float(zl[k]) for zl in zs) / K for k in range(len(zs[0]))]
        out.append(sum(_sq(_unit(p[j, i]), c) for j in range(K)) / K)
    return torch.tensor(out, dtype=torch.float64)


def brownian_ref(p, n):
    """(MSBReg, Eq. 4) per image i: 1/K Σ_j <n̂_i, p̂_ij>, float64 loops."""
    p, n = p.double(), n.double()
    K, B, _ = p.shape
    return torch.tensor([sum(sum(float(a) * float(b) for a, b in zip(_unit(n[i]), _unit(p[j, i])))
                             for j in range(K)) / K for i in range(B)], dtype=torch.float64)


def covariance_ref(pj):
    """(MSBReg, Eq. 5) S = 1/(n-1) Σ_i (p_i - p̄)(p_i - p̄)ᵀ, float64 loops over the batch rows."""
    pj = pj.double()
    n, d = pj.shape
    mean = [sum(float(pj[i, a]) for i in range(n)) / n for a in range(d)]
    S = torch.zeros(d, d, dtype=torch.float64)
    for i in range(n):
        for a in range(d):
            for b in range(d):
                S[a, b] += (float(pj[i, a]) - mean[a]) * (float(pj[i, b]) - mean[b])
    return S / (n - 1)


def singular_value_ref(p, normalized=False):
    """(MSBReg, Eq. 6) 1/K Σ_j ||S_j - I||_F² with S_j from the loop above."""
    total = 0.0
    for pj in p.double():
        if normalized:
            pj = torch.stack([_unit(r) for r in pj])
        S = covariance_ref(pj)
        total += sum((float(S[a, b]) - (a == b)) ** 2 for a in range(S.shape[0]) for b in range(S.shape[1]))
    return total / p.shape[0]


@pytest.mark.parametrize("K", [2, 4, 8])
def test_centroid_loss_matches_float64_reference(K):
    p, z = torch.randn(K, 9, 6) * 2, torch.randn(K, 9, 6) * 0.5  # fresh random inputs each run
    torch.testing.assert_close(ms.centroid_loss(p, z).double(), centroid_ref(p, z), rtol=1e-5, atol=1e-6)
    # every view on its target direction, all views of an image on the same direction -> 0
    same = torch.randn(1, 9, 6).expand(K, 9, 6)
    assert ms.centroid_loss(3 * same, 0.2 * same).abs().max() < 1e-5


@pytest.mark.parametrize("K", [2, 4, 8])
def test_brownian_loss_matches_float64_reference(K):
    p, n = torch.randn(K, 7, 5) * 3, torch.randn(7, 5)
    torch.testing.assert_close(ms.brownian_loss(p, n).double(), brownian_ref(p, n), rtol=1e-5, atol=1e-6)
    # p̂_j = -n̂ for every view: the minimum -1; independent of the scale of n and p
    torch.testing.assert_close(ms.brownian_loss(-4 * n.expand(K, 7, 5), 0.1 * n), -torch.ones(7))


@pytest.mark.parametrize("normalized", [False, True])
def test_singular_value_loss_matches_float64_reference(normalized):
    for K, n, d in ((2, 11, 4), (4, 7, 6)):
        p = torch.randn(K, n, d) * 1.5 + torch.randn(d)  # non-zero mean: the covariance must centre
        got = ms.singular_value_loss(p, normalized).item()
        assert abs(got - singular_value_ref(p, normalized)) < 1e-4 * max(1.0, abs(got))


def test_eq6_equals_eq7_on_the_same_covariance():
    """||S - I||_F² = Σ_i (σ_i - 1)² for the (symmetric PSD) covariance S of Eq. 5."""
    p = torch.randn(3, 10, 5, dtype=torch.float64)
    eq7 = 0.0
    for pj in p:
        S = covariance_ref(pj)
        sigma = torch.linalg.svdvals(S)
        eq6_j = ((S - torch.eye(5, dtype=torch.float64)) ** 2).sum()
        eq7_j = ((sigma - 1) ** 2).sum()
        torch.testing.assert_close(eq6_j, eq7_j, rtol=1e-10, atol=1e-12)
        eq7 += eq7_j.item() / 3
    assert abs(ms.singular_value_loss(p).item() - eq7) < 1e-9
    # white data of batch >> d gives S ≈ I and a small loss; a collapsed batch gives about d per view
    white = torch.randn(1, 20000, 5, dtype=torch.float64)
    assert ms.singular_value_loss(white).item() < 0.01
    assert abs(ms.singular_value_loss(torch.ones(2, 16, 5)).item() - 5.0) < 1e-6


def test_byol_loss_eq1_matches_reference_and_crosses_the_views():
    p, z = torch.randn(2, 8, 5), torch.randn(2, 8, 5)
    ref = [(_sq(_unit(p[0, i].double()), _unit(z[1, i].double()))
            + _sq(_unit(p[1, i].double()), _unit(z[0, i].double()))) / 2 for i in range(8)]
    torch.testing.assert_close(ms.byol_loss(p, z).double(), torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)


def test_k2_centroid_loss_exact_relation_to_byol():
    """K = 2, λ_s = λ_b = 0. With d_jl = ||p̂_j - ẑ'_l||² and c = (ẑ'_1 + ẑ'_2)/2, the parallel-axis identity
    ½(d_j1 + d_j2) = ||p̂_j - c||² + ¼||ẑ'_1 - ẑ'_2||² gives, per image,

        L_c = ½ L_BYOL + ¼ (d_11 + d_22) - ¼ ||ẑ'_1 - ẑ'_2||²,   L_BYOL = ½ (d_12 + d_21)  (Eq. 1, symmetrised),

    so Eq. 3 at K = 2 is half of BYOL's loss plus the same-view terms, up to a constant of the target; the
    gradients differ by ¼ ∇(d_11 + d_22). Checked in value and in gradient."""
    p = torch.randn(2, 10, 6, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 10, 6, dtype=torch.float64)
    pn, zn = torch.nn.functional.normalize(p, dim=-1), torch.nn.functional.normalize(z, dim=-1)
    d = lambda j, l: (pn[j] - zn[l]).pow(2).sum(-1)  # noqa: E731
    spread = (zn[0] - zn[1]).pow(2).sum(-1)
    rhs = 0.5 * ms.byol_loss(p, z) + 0.25 * (d(0, 0) + d(1, 1)) - 0.25 * spread
    lhs = ms.centroid_loss(p, z)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    g_lhs, = torch.autograd.grad(lhs.sum(), p)
    g_rhs, = torch.autograd.grad((0.5 * ms.byol_loss(p, z) + 0.25 * (d(0, 0) + d(1, 1))).sum(), p)
    torch.testing.assert_close(g_lhs, g_rhs, rtol=1e-10, atol=1e-12)
    # and it is not BYOL itself: the same-view terms change the gradient
    g_byol, = torch.autograd.grad((0.5 * ms.byol_loss(p, z)).sum(), p)
    assert (g_lhs - g_byol).abs().max() > 1e-3


def test_centroid_loss_equals_mean_pairwise_distance_minus_target_spread():
    """§3.2: "minimizing Eq. 3 is identical to minimizing pairwise distance": for any K,
    L_c = 1/K² Σ_{j,l} ||p̂_j - ẑ'_l||² - 1/K Σ_l ||ẑ'_l - c||²  (the second term has no gradient)."""
    K = 4
    p, z = torch.randn(K, 6, 5, dtype=torch.float64), torch.randn(K, 6, 5, dtype=torch.float64)
    pn, zn = torch.nn.functional.normalize(p, dim=-1), torch.nn.functional.normalize(z, dim=-1)
    pair = sum((pn[j] - zn[l]).pow(2).sum(-1) for j in range(K) for l in range(K)) / K ** 2
    spread = sum((zn[l] - zn.mean(0)).pow(2).sum(-1) for l in range(K)) / K
    torch.testing.assert_close(ms.centroid_loss(p, z), pair - spread, rtol=1e-12, atol=1e-12)


def _tiny_model():
    m = Cfg.wrap(copy.deepcopy(BASE["model"]))
    m.update(width=8, proj_hidden=16, proj_dim=8, pred_hidden=16, head_norm="bn")
    return m


@pytest.mark.parametrize("head_norm", ["bn", "ln"])
def test_gradient_flow_target_gets_none(head_norm):
    m = _tiny_model()
    m.head_norm = head_norm
    online = ms.MultiViewOnline(m)
    assert any(isinstance(x, torch.nn.LayerNorm if head_norm == "ln" else torch.nn.BatchNorm1d)
               for x in online.g.modules())
    target = copy.deepcopy(torch.nn.Sequential(online.f, online.g))
    xs = [torch.randn(6, 3, 16, 16) for _ in range(4)]
    z, p = online(xs)
    assert p.shape == z.shape == (4, 6, 8)
    z_t = torch.stack([target(x) for x in xs])  # built with grad enabled on purpose: the losses must detach
    loss = (ms.centroid_loss(p, z_t).mean() + 0.004 * ms.singular_value_loss(p)
            + 0.5 * ms.brownian_loss(p, torch.randn(6, 8)).mean())
    loss.backward()
    assert all(q.grad is None for q in target.parameters())
    assert all(q.grad is not None for q in online.parameters())
    # each regulariser alone reaches the predictor and the encoder (they act on p, Eq. 4-6)
    for term in (lambda p: ms.singular_value_loss(p), lambda p: ms.brownian_loss(p, torch.randn(6, 8)).mean()):
        online.zero_grad(set_to_none=True)
        term(online(xs)[1]).backward()
        assert all(q.grad is not None for q in online.h.parameters())
        assert online.f.conv1.weight.grad.abs().sum() > 0


def test_brownian_direction_shared_by_views_and_different_between_images():
    K, B, d = 4, 32, 64
    noise = ms.BrownianNoise(d, seed=3, device="cpu")
    n = noise(B)
    assert n.shape == (B, d)  # one vector per image, broadcast over its K views by brownian_loss
    # the gradient of L_b w.r.t. the unit prediction u_ij of view j of image i is (I - u uᵀ) n̂_i / (K B):
    # the same direction n̂_i for every view j (less its radial part, removed by the normalisation)
    u = torch.nn.functional.normalize(torch.randn(K, B, d), dim=-1).requires_grad_()
    g, = torch.autograd.grad(ms.brownian_loss(u, n).mean(), u)
    n_hat = torch.nn.functional.normalize(n, dim=-1)
    radial = (u * n_hat).sum(-1, keepdim=True) * u
    torch.testing.assert_close(g * (K * B) + radial, n_hat.expand(K, B, d), rtol=1e-4, atol=1e-5)
    # different images get different directions (nearly orthogonal in d = 64), fresh each step
    cos = n_hat @ n_hat.T
    assert (cos - torch.eye(B)).abs().max() < 0.7 and cos.diagonal().allclose(torch.ones(B))
    assert not torch.allclose(noise(B), n)


def test_brownian_noise_is_seeded_resumable_and_independent_of_process_count(monkeypatch):
    B, d = 12, 5
    one = ms.BrownianNoise(d, seed=7, device="cpu")
    ref = [one(B) for _ in range(3)]
    # resume: the state saved after step 1 reproduces steps 2 and 3
    again = ms.BrownianNoise(d, seed=7, device="cpu")
    again(B)
    saved = copy.deepcopy(again.state_dict())
    other = ms.BrownianNoise(d, seed=123, device="cpu")
    other.load_state_dict(saved)
    torch.testing.assert_close(other(B), ref[1])
    torch.testing.assert_close(other(B), ref[2])
    # W processes: rank r holds the global rows r, r+W, ... (the sampler's split, checked below)
    for W in (2, 3):
        ranks = []
        for r in range(W):
            monkeypatch.setattr(ms.dist, "world_size", lambda W=W: W)
            monkeypatch.setattr(ms.dist, "rank", lambda r=r: r)
            noise = ms.BrownianNoise(d, seed=7, device="cpu")
            ranks.append([noise(B // W) for _ in range(3)])
        for step in range(3):
            glued = torch.empty(B, d)
            for r in range(W):
                glued[r::W] = ranks[r][step]
            torch.testing.assert_close(glued, ref[step])


def test_sampler_gives_rank_r_the_global_rows_r_plus_multiples_of_w():
    """The premise of BrownianNoise: image at position q of a global batch is row q on every process count."""
    data = list(range(40))
    B = 8
    one = list(ResumableSampler(data, B, num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True))
    for W in (2, 4):
        per_rank = [list(ResumableSampler(data, B // W, num_replicas=W, rank=r, shuffle=True, seed=5,
                                          drop_last=True)) for r in range(W)]
        for t in range(len(one) // B):  # global batch t
            glued = [None] * B
            for r in range(W):
                glued[r::W] = per_rank[r][t * (B // W):(t + 1) * (B // W)]
            assert glued == one[t * B:(t + 1) * B]


@pytest.mark.parametrize("normalized", [False, True])
def test_singular_values_diagnostic_is_eq6_on_the_test_predictions(normalized):
    """The evaluation diagnostic Σ(σ - 1)² over the test set's predictions (eval mode) equals Eq. 6's loss on
    those predictions (Eq. 7 = Eq. 6), with σ the eigenvalues of the float64 covariance (Eq. 5); the training
    mode is left as it was."""
    online = ms.MultiViewOnline(_tiny_model())
    for _ in range(2):  # BatchNorm running statistics away from their init
        online(torch.randn(2, 6, 3, 16, 16).unbind(0))
    x = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    loaders = {"test": [(x[:25], torch.zeros(25)), (x[25:], torch.zeros(15))]}
    f_test, _ = extract_features(online.f, loaders["test"], torch.device("cpu"))
    got = ms.singular_values(online, f_test, normalized)
    assert online.training
    online.eval()
    with torch.no_grad():
        p = online.h(online.g(online.f(x))).double()
    ref = singular_value_ref(p[None], normalized)
    assert got["sv_dist_test"] == pytest.approx(ref, rel=1e-8)
    pn = torch.nn.functional.normalize(p, dim=-1) if normalized else p
    eig = torch.linalg.eigvalsh(covariance_ref(pn))
    assert (got["sv_max_test"], got["sv_min_test"]) == pytest.approx((eig[-1].item(), eig[0].item()), rel=1e-8)
