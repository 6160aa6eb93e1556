"""Speed ratios, measured side by side in one run on the current device.

    python -m common.benchmark                 # CPU or the visible GPU
    python -m common.benchmark --size 32 --batch 256 --width 16 --repeats 5

(a) augmentation: images/s of the batched on-device view pipeline
    (``augment.batched_view``) vs the per-image torchvision v2 pipeline
    (``augment.cpu_view``, one image at a time, as a DataLoader worker runs it),
    both making BYOL's two views of the same uint8 images.
(b) training step: the time of one full ``byol_uniform`` optimizer step (online
    f, g, q on both views, target forward, BYOL + uniformity loss, backward, LARS
    step, EMA update) divided by the time of a bare encoder forward+backward on
    the same two views. Views are made beforehand, so (b) excludes augmentation.

Each timing is the median of ``--repeats`` runs after a warm-up.
"""
import argparse
import statistics
import time
from copy import deepcopy

import torch

from common.augment import ViewMaker, cpu_view, view_specs
from common.config import BASE, Cfg
from common.data import make_synthetic, stats


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_augment(images, size, dev, repeats):
    mean, std = stats("synthetic")
    aug = Cfg.wrap(deepcopy(BASE["augment"]))
    maker = ViewMaker(aug, 2, size, mean, std, dev, seed=0)
    cpu = [cpu_view(size, s, mean, std) for s in view_specs(aug, 2)]
    n_cpu = min(len(images), 512)
    t_batched = timeit(lambda: maker(images), dev, repeats)
    t_cpu = timeit(lambda: [[t(img) for t in cpu] for img in images[:n_cpu]], torch.device("cpu"), repeats)
    return len(images) / t_batched, n_cpu / t_cpu


def bench_byol_step(images, size, width, dev, repeats):
    import byol_uniform as bu  # the script's own pieces
    from common.ema import EMA
    from common.optim import build, param_groups

    cfg = Cfg.wrap(deepcopy({**BASE, **bu.DEFAULTS}))
    cfg.model.update(width=width, proj_hidden=512, proj_dim=128, pred_hidden=512)
    online = bu.Online(cfg.model).to(dev)
    target = deepcopy(torch.nn.Sequential(online.f, online.g))
    ema = EMA(target, torch.nn.Sequential(online.f, online.g))
    opt = build(cfg.optim, param_groups([online], 1e-6), 0.1)
    mean, std = stats("synthetic")
    x1, x2 = ViewMaker(cfg.augment, 2, size, mean, std, dev, seed=0)(images)

    def full_step():
        (z1, z2), (p1, p2) = online([x1, x2])
        with torch.no_grad():
            t1, t2 = target(x1), target(x2)
        loss = (bu.byol_loss(p1, t2) + bu.byol_loss(p2, t1)).mean()
        loss = loss + 0.125 * (bu.uniformity_loss(z1) + bu.uniformity_loss(z2)) / 2
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(0.99)

    encoder = deepcopy(online.f)

    def encoder_step():
        for x in (x1, x2):
            encoder(x).sum().backward()
        encoder.zero_grad(set_to_none=True)

    return timeit(full_step, dev, repeats), timeit(encoder_step, dev, repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 width for (b) (64 = torchvision's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    images, _ = make_synthetic(args.batch, args.size, 10, seed=0)
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{args.batch} images {args.size}x{args.size}, median of {args.repeats}")
    fast, slow = bench_augment(images, args.size, dev, args.repeats)
    print(f"(a) augmentation, 2 BYOL views: batched {fast:,.0f} img/s | per-image torchvision v2 {slow:,.0f} img/s "
          f"| ratio {fast / slow:.1f}x")
    t_full, t_enc = bench_byol_step(images, args.size, args.width, dev, args.repeats)
    print(f"(b) byol_uniform step (ResNet-18 width {args.width}): full step {t_full * 1e3:.1f} ms | bare encoder "
          f"fwd+bwd on the same 2 views {t_enc * 1e3:.1f} ms | ratio {t_full / t_enc:.2f}x")


if __name__ == "__main__":
    main()
