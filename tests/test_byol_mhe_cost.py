"""What the MHE term (BYOL-MHE Eq. 10) costs per training step, measured side by side in one process.

    python tests/test_byol_mhe_cost.py                                  # ResNet-18 CIFAR sizes, this device
    python tests/test_byol_mhe_cost.py --arch resnet50 --batch 64 --parts projector predictor

Times (median of --repeats, interleaved so that machine load hits both alike, after one warm-up):
  byol   one full optimizer step without MHE: online f, g, q on two views, target forward, BYOL loss,
         backward, LARS step, EMA update (views made beforehand: augmentation excluded)
  +mhe   the same step with λ Σ E_s/(N(N-1)) over the chosen layers added to the loss (as byol_mhe.py)
  mhe    the MHE term alone, forward + backward, and per layer
ratio = +mhe / byol. The heads have the paper's sizes (4096 hidden, 256 out), so the projector's first
layer is 4096x512 (ResNet-18) or 4096x2048 (ResNet-50).
"""
import argparse
import statistics
import sys
import time
from copy import deepcopy
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import byol_mhe as bm  # noqa: E402
from common import dist  # noqa: E402
from common.config import BASE, Cfg  # noqa: E402
from common.ema import EMA  # noqa: E402
from common.optim import build, param_groups  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev):
    _sync(dev)
    t = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t


def measure(arch="resnet18", width=64, batch=128, size=32, power="a2", parts=("projector", "predictor"),
            proj_hidden=4096, proj_dim=256, device="cpu", repeats=3, weight=10.0):
    dev = torch.device(device)
    if dev.type == "cpu":
        dist.keep_freed_memory()  # as the scripts' CPU runs do (common.dist.launch)
    torch.manual_seed(0)
    cfg = Cfg.wrap(deepcopy(BASE))
    cfg.model.update(arch=arch, width=width, cifar_stem=True, proj_hidden=proj_hidden, proj_dim=proj_dim,
                     pred_hidden=proj_hidden)
    online = bm.Online(cfg.model).to(dev)
    target = deepcopy(torch.nn.Sequential(online.f, online.g))
    ema = EMA(target, torch.nn.Sequential(online.f, online.g))
    opt = build(cfg.optim, param_groups([online], 1e-6), 0.1)
    layers = bm.mhe_layers(online, parts)
    x1, x2 = torch.randn(batch, 3, size, size, device=dev), torch.randn(batch, 3, size, size, device=dev)

    def step(with_mhe):
        (z1, z2), (p1, p2) = online([x1, x2])
        with torch.no_grad():
            t1, t2 = target(x1), target(x2)
        loss = (bm.byol_loss(p1, t2) + bm.byol_loss(p2, t1)).mean()
        if with_mhe:
            loss = loss + weight * bm.mhe_loss(layers, power).to(dev)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(0.99)

    def mhe_only(modules):
        bm.mhe_loss(modules, power).backward()
        opt.zero_grad(set_to_none=True)

    runs = {"byol": lambda: step(False), "+mhe": lambda: step(True), "mhe": lambda: mhe_only(layers)}
    runs.update({f"mhe {k} {tuple(m.weight.shape)}": (lambda m=m: mhe_only({"l": m})) for k, m in layers.items()})
    times = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(_time(fn, dev))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["ratio"] = out["+mhe"] / out["byol"]
    return out


def test_measured_step_includes_the_mhe_gradient_and_reports_a_ratio():
    """The harness times what byol_mhe.py runs: with MHE, the regularised layers get another update."""
    torch.manual_seed(0)
    cfg = Cfg.wrap(deepcopy(BASE["model"]))
    cfg.update(width=8, proj_hidden=64, proj_dim=16, pred_hidden=64)
    online = bm.Online(cfg)
    layers = bm.mhe_layers(online, ["projector"])
    x = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    (z1, z2), (p1, p2) = online(x)
    l_byol = (bm.byol_loss(p1, z2) + bm.byol_loss(p2, z1)).mean()
    g0 = torch.autograd.grad(l_byol, layers["projector.0"].weight, retain_graph=True)[0]
    g1 = torch.autograd.grad(l_byol + 10 * bm.mhe_loss(layers, "a2"), layers["projector.0"].weight)[0]
    assert not torch.allclose(g0, g1)
    r = measure(width=8, batch=8, size=16, proj_hidden=64, proj_dim=16, repeats=1)
    assert r["ratio"] > 0 and all(v > 0 for v in r.values())
    assert {"mhe projector.0 (64, 64)", "mhe predictor.3 (16, 64)"} <= set(r)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--power", default="a2")
    ap.add_argument("--parts", nargs="+", default=["projector", "predictor"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    res = measure(a.arch, a.width, a.batch, a.size, a.power, tuple(a.parts), device=a.device, repeats=a.repeats)
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{a.arch} width {a.width}, batch {a.batch} at {a.size}x{a.size}, MHE {a.power} on {' + '.join(a.parts)}, "
          f"{name}, median of {a.repeats}")
    for k, v in res.items():
        print(f"  {k:32s} {v:.3f}" + ("" if k == "ratio" else " s"))
