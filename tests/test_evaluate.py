"""Tests for common/evaluate.py: k-NN, linear probes and diagnostics against definitions in float64."""
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, so `common` imports without a conftest
from common import evaluate as ev  # noqa: E402
from common.config import UserError  # noqa: E402


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# Float32 cosine similarities of rows of d <= 16 dims are within (2d + 4) u <= 2.2e-6 of float64's (u = 2^-24: the
# norm's sum of d squares, the square root and the division, then a dot of d products of unit vectors), whatever
# the order in which a kernel sums: two similarities further apart than SIM_TOL = 1e-5 keep their order in float32
SIM_TOL = 1e-5


def _brute_knn(train_f, train_y, test_f, k, t, num_classes, weighted, exact=False):
    """Reference k-NN written from the definition: python loops, float64 (equal similarities: the lower bank
    index first; equal votes: the lower class). It also asserts the premise of holding the float32 k-NN to it:
    the data leaves no near-tie that float32 round-off could break another way. The k-th and (k+1)-th
    similarities are SIM_TOL apart, unless ``exact`` (data whose float32 similarities are exact: ``tie_bank``);
    the weighted vote's best class leads the next by 4 SIM_TOL / t relative (each weight exp(s / t) is within
    2 SIM_TOL / t of float64's), unless all the neighbours of the classes that tie are at the largest similarity
    (weights exp(0) = 1: exact counts); in the majority vote, classes of equal count differ by 2 k SIM_TOL in
    summed similarity, unless ``exact`` (sums of exact multiples of 1/4)."""
    tr = train_f.double()
    tr = tr / tr.norm(dim=1, keepdim=True)
    preds = []
    for q in test_f.double():
        q = q / q.norm()
        sims = [float(q @ tr[j]) for j in range(len(tr))]
        ranked = sorted(range(len(tr)), key=lambda j: -sims[j])  # stable: the lower index first among equals
        order = ranked[: min(k, len(tr))]
        assert exact or k >= len(tr) or sims[ranked[k - 1]] - sims[ranked[k]] > SIM_TOL, "near-tie at the k-th place"
        score, count, ssum = [0.0] * num_classes, [0] * num_classes, [0.0] * num_classes
        for j in order:
            c = int(train_y[j])
            score[c] += math.exp(sims[j] / t)
            count[c] += 1
            ssum[c] += sims[j]
        if weighted:
            best = max(range(num_classes), key=lambda c: (score[c], -c))
            near = {c for c in range(num_classes) if score[c] > score[best] * (1 - 4 * SIM_TOL / t)}
            top = sims[order[0]]
            assert len(near) == 1 or all(sims[j] == top for j in order if int(train_y[j]) in near), "near-tie vote"
        else:
            best = max(range(num_classes), key=lambda c: (count[c], ssum[c], -c))
            assert exact or all(ssum[best] - ssum[c] > 2 * k * SIM_TOL for c in range(num_classes)
                                if c != best and count[c] == count[best]), "near-tie vote"
        preds.append(best)
    return torch.tensor(preds)


def knn_predict(train_f, train_y, test_f, k=200, t=0.1, num_classes=None, weighted=True):
    """The predictions of ``ev.knn_accuracies``: its cosine top-k search, then its vote ``ev._vote``."""
    bank = nn.functional.normalize(train_f, dim=1)
    sims, idx = (nn.functional.normalize(test_f, dim=1) @ bank.T).topk(min(k, len(bank)), dim=1)
    c = num_classes if num_classes is not None else int(train_y.max()) + 1
    return ev._vote(sims, train_y[idx], c, t, weighted)


def knn_accuracy(train_f, train_y, test_f, test_y, k=200, **kw):
    return ev.knn_accuracies(train_f, train_y, test_f, test_y, ks=(k,), **kw)[f"knn{k}"]


def _clusters(n_per, num_classes, dim, spread, seed):
    g = _gen(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    y = torch.arange(num_classes).repeat_interleave(n_per)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


# ----------------------------------------------------------------------------- k-NN
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_knn_matches_bruteforce(weighted, k):
    g = _gen(10 + k)
    train_f, test_f = torch.randn(150, 12, generator=g), torch.randn(40, 12, generator=g)
    train_y, test_y = torch.randint(0, 4, (150,), generator=g), torch.randint(0, 4, (40,), generator=g)
    ref = _brute_knn(train_f, train_y, test_f, k, 0.1, 4, weighted)
    pred = knn_predict(train_f, train_y, test_f, k=k, t=0.1, num_classes=4, weighted=weighted)
    assert torch.equal(pred, ref)
    assert knn_accuracy(train_f, train_y, test_f, ref, k=k, num_classes=4, weighted=weighted, chunk=16) == 100.0
    acc = knn_accuracy(train_f, train_y, test_f, test_y, k=k, num_classes=4, weighted=weighted, chunk=16)
    assert acc == pytest.approx(100.0 * (ref == test_y).double().mean().item())


def test_knn_small_temperature_no_overflow():
    g = _gen(3)
    train_f, test_f = torch.randn(100, 8, generator=g), torch.randn(20, 8, generator=g)
    train_y = torch.randint(0, 3, (100,), generator=g)
    ref = _brute_knn(train_f, train_y, test_f, 15, 0.05, 3, True)
    assert torch.equal(knn_predict(train_f, train_y, test_f, k=15, t=0.05, num_classes=3), ref)
    ref = _brute_knn(train_f, train_y, test_f, 15, 0.005, 3, True)  # float64: exp(200) is finite
    pred = knn_predict(train_f, train_y, test_f, k=15, t=0.005, num_classes=3)  # exp(200) overflows fp32
    assert torch.equal(pred, ref) and torch.equal(ref, _brute_knn(train_f, train_y, test_f, 1, 0.1, 3, True))  # 1-NN


def test_knn_unweighted_tie_goes_to_larger_similarity_sum():
    ang = torch.tensor([10.0, 80.0, 30.0, 40.0]).deg2rad()  # class 0 owns the nearest, class 1 the larger sum
    train_f = torch.stack([ang.cos(), ang.sin()], 1)
    train_y = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train_f, train_y, q, k=4, weighted=False).item() == 1
    assert knn_predict(train_f, train_y, q, k=1, weighted=False).item() == 0


def test_knn_clustered_is_perfect():
    x, y = _clusters(60, 5, 16, 0.1, seed=1)
    xt, yt = _clusters(20, 5, 16, 0.1, seed=1)  # same centres, the noise repeats too: use another noise draw
    xt = xt + 0.1 * torch.randn(xt.shape, generator=_gen(2))
    assert knn_accuracy(x, y, xt, yt) == 100.0  # k=200 > 60 per class: weights must do the work
    assert knn_accuracy(x, y, xt, yt, k=20, weighted=False) == 100.0


def test_knn_k_larger_than_bank():
    g = _gen(4)
    train_f, train_y = torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)
    test_f, test_y = torch.randn(25, 6, generator=g), torch.randint(0, 3, (25,), generator=g)
    for weighted in (True, False):
        ref = _brute_knn(train_f, train_y, test_f, 30, 0.1, 3, weighted)
        assert torch.equal(knn_predict(train_f, train_y, test_f, k=200, weighted=weighted), ref)
    accs = ev.knn_accuracies(train_f, train_y, test_f, test_y, ks=(5, 20, 200))
    assert set(accs) == {"knn5", "knn20", "knn200"}
    assert accs["knn200"] == knn_accuracy(train_f, train_y, test_f, test_y, k=30)


def tie_bank(seed=3):
    """A bank of 8 directions, each held by 5 rows of mixed labels, shuffled; queries at those directions: a k-th
    place inside a group of equal similarities, which the lower bank index wins. The ties are exact whatever the
    order in which a kernel sums: each direction has 4 entries of +-1 and 2 of 0 (norm 2), each query is one times
    a power of two, so the normalised rows hold 0 and +-1/2 and every similarity (between directions too) is a
    multiple of 1/4, exact in float32 (and TF32, bfloat16)."""
    g = _gen(seed)
    supports = list(itertools.combinations(range(6), 4))
    dirs = torch.zeros(8, 6)
    for i, s in enumerate(torch.randperm(len(supports), generator=g)[:8].tolist()):
        dirs[i, list(supports[s])] = 1.0
    dirs = dirs * (torch.randint(0, 2, (8, 6), generator=g) * 2 - 1)  # random signs
    order = torch.randperm(40, generator=g)
    train_f, train_y = dirs.repeat_interleave(5, 0)[order], torch.randint(0, 4, (40,), generator=g)
    pick, scale = torch.randint(0, 8, (30,), generator=g), 2.0 ** torch.randint(-1, 3, (30, 1), generator=g)
    return train_f, train_y, dirs[pick] * scale, torch.randint(0, 4, (30,), generator=g)


@pytest.mark.parametrize("weighted", [True, False])
def test_knn_ties_go_to_the_lower_bank_index_in_any_blocks(weighted):
    train_f, train_y, test_f, _ = tie_bank()
    changed = 0
    for k in (1, 3, 7, 12):
        ref = _brute_knn(train_f, train_y, test_f, k, 0.1, 4, weighted, exact=True)  # sorted(): lower index first
        # the rule decides: the higher index first (the lower one of the reversed bank) changes some predictions
        changed += (_brute_knn(train_f.flip(0), train_y.flip(0), test_f, k, 0.1, 4, weighted, exact=True) != ref).sum()
        for block, chunk in ((4096, 1024), (7, 5), (12, 30)):  # one block; blocks with a padded edge
            assert knn_accuracy(train_f, train_y, test_f, ref, k=k, num_classes=4, weighted=weighted, block=block,
                                chunk=chunk) == 100.0, (k, block)
    assert changed > 0


def test_knn_accuracies_reuse_matches_single_k():
    g = _gen(5)
    train_f, train_y = torch.randn(200, 10, generator=g), torch.randint(0, 5, (200,), generator=g)
    test_f, test_y = torch.randn(60, 10, generator=g), torch.randint(0, 5, (60,), generator=g)
    for weighted in (True, False):
        accs = ev.knn_accuracies(train_f, train_y, test_f, test_y, ks=(5, 20, 200), weighted=weighted, chunk=7)
        for k in (5, 20, 200):  # the same query chunks: the same similarities, bit for bit
            assert accs[f"knn{k}"] == knn_accuracy(train_f, train_y, test_f, test_y, k=k, weighted=weighted, chunk=7)


# ----------------------------------------------------------------------------- diagnostics
def _unit(n, d, seed):
    z = torch.randn(n, d, generator=_gen(seed), dtype=torch.float64)
    return z / z.norm(dim=1, keepdim=True)


def test_uniformity_matches_double_loop_and_pdist():
    z = _unit(25, 5, 0)
    for t in (2, 0.5):
        terms = [math.exp(-t * float((z[i] - z[j]).pow(2).sum())) for i in range(25) for j in range(25) if i != j]
        ref = math.log(sum(terms) / len(terms))
        assert ev.uniformity(z, t=t).item() == pytest.approx(ref, rel=1e-10)
        assert ev.uniformity(3 * z, t=t).item() == pytest.approx(ref, rel=1e-10)  # normalises its input
        pd = torch.pdist(z).pow(2).mul(-t).exp().mean().log().item()
        assert ev.uniformity(z.float(), t=t).item() == pytest.approx(pd, rel=1e-4)


def test_uniformity_gradient_spreads_points():
    z = (torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(64, 3, generator=_gen(1))).requires_grad_()
    opt = torch.optim.SGD([z], lr=20.0)  # the mean over n(n-1) pairs makes per-point gradients O(1/n)
    start = ev.uniformity(z).item()
    for _ in range(30):
        loss = ev.uniformity(z)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
        opt.step()
    assert ev.uniformity(z).item() < start - 0.5
    assert ev.center_vector_norm(z.detach()).item() < 0.9  # no longer all pointing one way


def test_alignment_matches_loop():
    a, b = 2 * _unit(30, 6, 2), _unit(30, 6, 3)
    a_n = a / a.norm(dim=1, keepdim=True)
    for alpha in (2, 1):
        ref = sum(float((a_n[i] - b[i]).norm()) ** alpha for i in range(30)) / 30
        assert ev.alignment(a, b, alpha=alpha).item() == pytest.approx(ref, rel=1e-10)
    assert ev.alignment(a, 5 * a).item() == pytest.approx(0.0, abs=1e-12)


def test_center_vector_norm():
    z = torch.randn(40, 7, generator=_gen(4), dtype=torch.float64)
    s = sum(z[i] / z[i].norm() for i in range(40)) / 40
    assert ev.center_vector_norm(z).item() == pytest.approx(float(s.norm()), rel=1e-10)
    assert ev.center_vector_norm(torch.tensor([[3.0, 4.0]] * 10)).item() == pytest.approx(1.0, rel=1e-6)
    u = torch.randn(16, 7, generator=_gen(5))
    assert ev.center_vector_norm(torch.cat([u, -2 * u])).item() == pytest.approx(0.0, abs=1e-6)


def test_correlation_distance():
    f = torch.randn(50, 6, generator=_gen(6), dtype=torch.float64) @ torch.randn(6, 6, generator=_gen(7),
                                                                                dtype=torch.float64)
    n, d = f.shape
    mu = [sum(f[i, a] for i in range(n)) / n for a in range(d)]
    cov = [[sum((f[i, a] - mu[a]) * (f[i, b] - mu[b]) for i in range(n)) for b in range(d)] for a in range(d)]
    ref = sum((float(cov[a][b] / math.sqrt(cov[a][a] * cov[b][b])) - (a == b)) ** 2
              for a in range(d) for b in range(d))
    assert ev.correlation_distance(f).item() == pytest.approx(ref, rel=1e-6)
    indep = torch.randn(20000, 8, generator=_gen(8))
    assert ev.correlation_distance(indep).item() < 0.05
    dup = indep[:, :1].repeat(1, 8)
    assert ev.correlation_distance(dup).item() == pytest.approx(8 * 8 - 8, rel=1e-3)


def test_covariance_spectrum_and_effective_rank():
    z = torch.randn(60, 5, generator=_gen(14), dtype=torch.float64) @ torch.randn(5, 5, generator=_gen(15),
                                                                                 dtype=torch.float64)
    zn = [z[i] / z[i].norm() for i in range(60)]  # from the definitions: covariance of the normalised rows
    mu = sum(zn) / 60
    cov = sum(torch.outer(r - mu, r - mu) for r in zn) / 59
    sv = ev.covariance_spectrum(z)
    torch.testing.assert_close(sv, torch.linalg.eigvalsh(cov).flip(0), rtol=1e-9, atol=1e-12)
    p = sv / sv.sum()
    assert ev.effective_rank(sv).item() == pytest.approx(math.exp(-sum(float(x * math.log(x)) for x in p)))
    iso = torch.randn(40000, 16, generator=_gen(16))
    assert ev.effective_rank(ev.covariance_spectrum(iso)).item() > 15.8  # isotropic: ~D
    line = torch.randn(500, 1, generator=_gen(17)) * torch.randn(1, 16, generator=_gen(18))
    assert ev.effective_rank(ev.covariance_spectrum(line)).item() == pytest.approx(1.0, abs=1e-6)  # one axis
    assert ev.effective_rank(torch.zeros(4)).item() == 0.0  # full collapse


def test_feature_std():
    healthy = ev.feature_std(torch.randn(4000, 64, generator=_gen(9)))
    assert healthy == pytest.approx(1 / math.sqrt(64), rel=0.05)
    collapsed = torch.randn(1, 64, generator=_gen(10)).repeat(500, 1) + 1e-6 * torch.randn(500, 64)
    assert ev.feature_std(collapsed) < 1e-4


# ----------------------------------------------------------------------------- probes and extraction
def test_linear_probe_separable():
    x, y = _clusters(100, 4, 32, 1.0, seed=11)
    xt, yt = _clusters(50, 4, 32, 1.0, seed=11)
    xt = xt + torch.randn(xt.shape, generator=_gen(12))
    x = 5 * x + 7  # standardisation makes the probe scale/shift invariant
    xt = 5 * xt + 7
    res = ev.linear_probe(x, y, xt, yt, num_classes=4, epochs=20, batch_size=64, lr=0.1)
    assert res["top1"] > 95 and res["top5"] == 100.0
    assert res == ev.linear_probe(x, y, xt, yt, num_classes=4, epochs=20, batch_size=64, lr=0.1)  # seeded
    res_adam = ev.linear_probe(x, y, xt, yt, num_classes=4, epochs=20, lr=1e-2, optimizer="adamw")
    assert res_adam["top1"] > 95
    chance = ev.linear_probe(x, y[torch.randperm(len(y), generator=_gen(13))], xt, yt, num_classes=4, epochs=20)
    assert chance["top1"] < 60  # shuffled labels: nothing to learn


def _image_loader(n_per, seed, shuffle, batch_size=32):
    g = _gen(seed)
    centres = torch.randn(3, 3, 4, 4, generator=_gen(100))
    y = torch.arange(3).repeat_interleave(n_per)
    x = centres[y] + 0.3 * torch.randn(len(y), 3, 4, 4, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)


def _tiny_encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU())


def test_extract_features_restores_mode_and_shapes():
    enc = _tiny_encoder()
    loader = _image_loader(20, 0, shuffle=False, batch_size=16)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    f, y = ev.extract_features(enc, loader, "cpu")
    assert enc.training and f.shape == (60, 16) and f.dtype == torch.float32 and y.shape == (60,)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # eval mode: BN stats untouched
    enc.eval()
    f2, _ = ev.extract_features(enc, loader, "cpu")
    assert not enc.training and torch.equal(f2, f)
    assert not f.requires_grad


def test_linear_probe_augmented():
    enc = _tiny_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    train, test = _image_loader(60, 1, shuffle=True), _image_loader(30, 2, shuffle=False)
    calls = []

    def augment(x):
        calls.append(x.shape[0])
        return x

    res = ev.linear_probe_augmented(enc, 16, 3, train, test, augment, "cpu", epochs=5, lr=0.1, nesterov=True)
    assert len(calls) == 5 * len(train) and sum(calls) == 5 * 180
    assert res["top1"] > 90 and res["top5"] == 100.0
    assert enc.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # frozen, BN stats untouched
    assert all(p.grad is None for p in enc.parameters())
    with pytest.raises(UserError, match="linear probe optimizer must be"):
        ev.linear_probe_augmented(enc, 16, 3, train, test, augment, "cpu", epochs=1, lr=0.1, optimizer="lbfgs")
