"""byol_mhe.py: hyperspherical energy (BYOL-MHE Eq. 8, 10, 11) vs float64 double loops written from the
equations, known geometry, gradient flow into exactly the configured layers, no NaN/Inf at coinciding or
antipodal neurons, and one Gram matrix (no Python loop over neurons) for the paper's 4096-neuron layers."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from common.config import BASE, Cfg

import byol_mhe as bm

POWERS = ("0", "1", "2", "a0", "a1", "a2")


def energy_ref(weight, power, paper_exact=False):
    """Σ_{i≠j} r_s(d(ŵ_i, ŵ_j)) / (N(N-1)), float64 double loop over the neurons (rows / flattened filters).

    paper_exact=True: Eq. 8 / Eq. 11 as printed: ŵ = w/||w||, d = ||ŵ_i - ŵ_j|| (direct difference) or
    arccos(ŵ_iᵀŵ_j). Otherwise the numerics of Liu et al.'s MHE code (byol_mhe.py): ||w|| = sqrt(Σw² + 1e-4),
    d² = 2 - 2cos with cos clamped into [-1+1e-6, 1-1e-6], θ = arccos(cos) + 1e-4.
    """
    rows = [[float(v) for v in r] for r in weight.detach().double().reshape(weight.shape[0], -1)]
    n, s, angular = len(rows), int(power[-1]), power.startswith("a")
    eps = 0.0 if paper_exact else 1e-4
    hat = [[v / math.sqrt(sum(x * x for x in r) + eps) for v in r] for r in rows]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            cos = sum(a * b for a, b in zip(hat[i], hat[j]))
            if paper_exact:
                d = math.acos(max(-1.0, min(1.0, cos))) if angular else \
                    math.sqrt(sum((a - b) ** 2 for a, b in zip(hat[i], hat[j])))
            else:
                cos = min(max(cos, -1 + 1e-6), 1 - 1e-6)
                d = math.acos(cos) + 1e-4 if angular else math.sqrt(2 - 2 * cos)
            total += math.log(1 / d) if s == 0 else d ** (-s)
    return total / (n * (n - 1))


def random_layers():
    """A Linear and a Conv2d with fresh random weights (random scale, so ||w|| is not always ~1)."""
    lin = nn.Linear(int(torch.randint(5, 12, ())), int(torch.randint(6, 14, ())))
    conv = nn.Conv2d(3, int(torch.randint(5, 11, ())), 3, bias=True)
    with torch.no_grad():
        lin.weight.mul_(torch.empty(()).uniform_(0.5, 5))
        conv.weight.mul_(torch.empty(()).uniform_(0.5, 5))
    return lin, conv


@pytest.mark.parametrize("power", POWERS)
def test_energy_matches_float64_double_loop_linear_and_conv(power):
    for layer in random_layers():
        n = layer.weight.shape[0]
        assert bm.neurons(layer.weight).shape == (n, layer.weight[0].numel())  # rows / flattened filters
        got = bm.hyperspherical_energy(layer.weight, power).item()
        # the MHE code's numerics, tight
        assert got == pytest.approx(energy_ref(layer.weight, power), rel=2e-5, abs=1e-6)
        # the equation as printed: differs only by the epsilons (θ + 1e-4, ||w||'s 1e-4, the cos clamp); for a
        # nearly coinciding pair of neurons they move E_s by up to ~2% (measured over 400 draws: 1.8e-2 for a2,
        # 1.7e-2 for 2, ≤ 4.2e-3 otherwise), so the bound is 5e-2: a wrong power or pairing is off by far more
        assert got == pytest.approx(energy_ref(layer.weight, power, paper_exact=True), rel=5e-2, abs=1e-4)
        # the normalisation is by N(N-1) ordered pairs (Eq. 10): the plain double-loop sum, undivided
        total = energy_ref(layer.weight, power) * n * (n - 1)
        assert got * n * (n - 1) == pytest.approx(total, rel=2e-5, abs=1e-5)


def test_energy_known_values():
    """Two orthogonal unit neurons: θ = π/2, ||ŵ_1 - ŵ_2|| = √2, 2 ordered pairs / (2·1)."""
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * 100  # large norm: the 1e-4 of ||w|| is negligible
    theta = math.pi / 2 + 1e-4
    expect = {"0": -math.log(math.sqrt(2)), "1": 2 ** -0.5, "2": 0.5,
              "a0": -math.log(theta), "a1": 1 / theta, "a2": theta ** -2}
    for p, e in expect.items():
        assert bm.hyperspherical_energy(w, p).item() == pytest.approx(e, rel=1e-5), p


def circle(n, spread):
    """n unit vectors in the plane at angles evenly spaced over [0, spread), as a Linear weight [n, 2]."""
    a = torch.arange(n) * spread / n
    return torch.stack([a.cos(), a.sin()], 1)


@pytest.mark.parametrize("power", POWERS)
def test_evenly_spaced_circle_has_lower_energy_than_bunched(power):
    n = int(torch.randint(4, 12, ()))
    rot = torch.linalg.qr(torch.randn(2, 2))[0]  # a random rotation changes nothing
    even = bm.hyperspherical_energy(circle(n, 2 * math.pi) @ rot, power)
    bunched = bm.hyperspherical_energy(circle(n, 1.0) @ rot, power)
    assert even < bunched


def min_angle(w):
    w = nn.functional.normalize(w.detach().double(), dim=1)
    cos = (w @ w.T).clamp(-1, 1)
    cos.fill_diagonal_(-1)
    return math.degrees(math.acos(cos.max().item()))


@pytest.mark.parametrize("power", POWERS)
def test_gradient_steps_on_energy_spread_random_unit_vectors(power):
    w = nn.functional.normalize(torch.randn(12, 3), dim=1).requires_grad_()
    before, e0 = min_angle(w), bm.hyperspherical_energy(w, power).item()
    opt = torch.optim.Adam([w], lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        bm.hyperspherical_energy(w, power).backward()
        opt.step()
    assert min_angle(w) > before + 2  # degrees: the closest pair moved apart
    assert bm.hyperspherical_energy(w, power).item() < e0


def tiny_online(norm="bn"):
    cfg = Cfg.wrap(copy.deepcopy(BASE["model"]))
    cfg.update(width=8, proj_hidden=16, proj_dim=8, pred_hidden=16, norm=norm)
    return bm.Online(cfg)


@pytest.mark.parametrize("parts", [p for k in range(4) for p in itertools.combinations(bm.PARTS, k)])
def test_gradient_flows_into_exactly_the_configured_layers(parts):
    online = tiny_online()
    nets = {"encoder": online.f, "projector": online.g, "predictor": online.q}
    layers = bm.mhe_layers(online, parts)
    loss = bm.mhe_loss(layers, "a2")
    if parts:
        loss.backward()
    expected = {id(m.weight) for p in parts for m in nets[p].modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {id(m.weight) for m in layers.values()} == expected
    assert len(expected) == sum({"encoder": 20, "projector": 2, "predictor": 2}[p] for p in parts)  # ResNet-18
    for name, p in online.named_parameters():
        if id(p) in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # biases, BN weights/biases and the layers of the other sub-networks
            assert p.grad is None, name
    for m in online.modules():
        if isinstance(m, nn.Linear):
            assert m.bias.grad is None  # biases are never neurons


def test_no_bn_model_regularises_the_same_layers():
    """Tab. 3's no-BN runs (model.norm=none): the heads lose their BN, the MHE layers stay the same."""
    online = tiny_online("none")
    assert not any(isinstance(m, nn.BatchNorm1d) for m in online.modules())
    assert len(bm.mhe_layers(online, bm.PARTS)) == 24


@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_no_nan_or_inf_when_neurons_coincide_or_are_antipodal(power, scale):
    base = torch.randn(6, 9)
    w = torch.cat([base, base[:1], -base[1:2], torch.zeros(1, 9)]) * scale  # a copy, an antipode, a zero row
    w.requires_grad_()
    e = bm.hyperspherical_energy(w, power)
    e.backward()
    assert torch.isfinite(e) and torch.isfinite(w.grad).all()
    # a Conv2d with two identical filters
    conv = nn.Conv2d(2, 4, 3)
    with torch.no_grad():
        conv.weight[1] = conv.weight[0] * scale
    e = bm.hyperspherical_energy(conv.weight, power)
    e.backward()
    assert torch.isfinite(e) and torch.isfinite(conv.weight.grad).all()


def test_energy_ignores_autocast_and_gradient_matches_float64():
    w = torch.randn(10, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = bm.hyperspherical_energy(w, "a2")
    assert e.dtype == torch.float32
    e.backward()
    w64 = w.detach().double().requires_grad_()
    bm.hyperspherical_energy(w64, "a2")  # float32 inside by design; the float64 reference gradient:
    n = w64.shape[0]
    hat = w64 / torch.sqrt((w64 * w64).sum(1, keepdim=True) + 1e-4)
    theta = torch.arccos((hat @ hat.T).clamp(-1 + 1e-6, 1 - 1e-6)) + 1e-4
    ((theta.pow(-2) * (1 - torch.eye(n, dtype=torch.float64))).sum() / (n * (n - 1))).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


class OpLog(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def energy_autograd64(w, power):
    """E_s/(N(N-1)) in float64 as one N x N expression with autograd: the script's literal form of Eq. 8 / 11."""
    return bm.hyperspherical_energy_literal(w, power)


@pytest.mark.parametrize("power", POWERS)
def test_literal_energy_is_the_double_loop(power):
    """The script's literal N x N form equals the float64 double loop written here from the equations."""
    w = torch.randn(9, 5, dtype=torch.float64) * torch.empty(9, 1, dtype=torch.float64).uniform_(0.5, 3)
    assert bm.hyperspherical_energy_literal(w, power).item() == pytest.approx(energy_ref(w, power), rel=1e-9)


@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_blockwise_energy_and_gradient_match_float64_autograd(power, rows):
    """Blocks of 1 row, of 5 rows (37 neurons: a short last block) and one block: the energy and its
    hand-derived gradient (2GŴ through the link term) against float64 autograd through the whole N x N
    expression; three neurons coincide or are antipodal (clamped pairs: no gradient through the clamp)."""
    u = torch.randn(1, 9)
    u = 100 * u / u.norm()  # ||w|| = 100: cos = ±(1 - 1e-8), inside the clamp
    w = torch.cat([u, u, -u, torch.randn(34, 9) * torch.empty(34, 1).uniform_(0.5, 3)]).requires_grad_()
    n = w.shape[0]
    e = bm.hyperspherical_energy(w, power, block=rows * n)
    e.backward()
    w64 = w.detach().double().requires_grad_()
    ref = energy_autograd64(w64, power)
    ref.backward()
    assert e.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6 * w64.grad.abs().max().item())


@pytest.mark.parametrize("shape", [(4096, 512), (4096, 2048)])
def test_paper_sized_layer_runs_in_blocks_and_is_accurate(shape):
    """The 4096x512 (ResNet-18 projector) and 4096x2048 (ResNet-50) layers: no Python loop over neurons. As
    one block: the same ops as for 8 neurons, three matrix products (C, GŴ for the block's rows, and for the
    rows below it: empty here); in the default blocks (2^20 pairs: 256 rows) three products per block;
    (4096x512) float32 value and gradient within 1e-4 of float64 autograd (a2)."""
    w = (torch.randn(*shape) * 0.02).requires_grad_()
    n = shape[0]
    for power in ("2", "a2") if shape[1] == 512 else ("a2",):
        w8 = torch.randn(8, shape[1])
        with OpLog() as small:
            bm.hyperspherical_energy(w8, power)
        with OpLog() as one:
            bm.hyperspherical_energy(w, power, block=n * n)
        with OpLog() as blocks:
            e = bm.hyperspherical_energy(w, power)
        mm = [sum(op in ("matmul", "mm", "__matmul__", "addmm_") for op in log.ops) for log in (one, blocks)]
        assert small.ops == one.ops and mm == [3, 3 * n // 256] and len(blocks.ops) < len(one.ops) * n // 256
        if shape[1] == 512:
            ref = energy_autograd64(w.detach().double(), power)
            assert e.item() == pytest.approx(ref.item(), rel=1e-4)
        if shape[1] == 512 and power == "a2":
            e.backward()
            w64 = w.detach().double().requires_grad_()
            ref = energy_autograd64(w64, power)
            ref.backward()
            torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4 * w64.grad.abs().max().item())
