"""Speed ratios, measured side by side in one run on the current device.

    python -m common.tools.benchmark                                   # ~8 min on 2 CPU cores (--width 16: ~2)
    python -m common.tools.benchmark --batch 256 --epoch-images 20000 --repeats 20              # a GPU
    python -m common.tools.benchmark --set precision=bf16 channels_last=true compile=true       # options on
    python -m common.tools.benchmark --mhe [--arch resnet50 --batch 64]                          # (d) only
    python -m common.tools.benchmark --gpu-check [--dry] [--out FILE.json]   # all GPU-only checks:
                                                                             # common/tools/gpu_check.py
    python -m common.tools.benchmark --at-scale    # memory and time to plan a cluster run: common/tools/at_scale.py

(a) augmentation: images/s of the batched on-device view pipeline (``ViewMaker``,
    ``augment.path: batched``) vs the per-image torchvision v2 pipeline (``cpu_view``, one
    image at a time, as a DataLoader worker runs it), both making BYOL's two views; then the
    same for MSBReg's K = 8 views, and the batched K = 8 time over the per-image K = 2 time.
(b) training step, for each of the six scripts with its default model (the script's
    ``DEFAULTS``; ResNet ``--width``): one full iteration of the script's loop (forward of
    every view, loss, backward, optimizer, schedule, EMA update) vs a bare forward+backward
    of the same encoder on the same views. How, without copying any loop: the script's own
    ``train(cfg)`` runs a few steps on ``synthetic`` (data on the device) with its
    ``ViewMaker`` replaced by ``_CachedViews``, which makes the views of the first batch
    once and returns them at every step; the time from the end of one call to the start
    of the next (device synced) is one iteration, augmentation excluded. Inside each call
    the bare encoder, built from the same resolved config, is timed on those views, so the
    two timings alternate and see the machine in the same state. For the
    four scripts with an EMA target (byol_uniform, byol_mhe, msbreg, raft) a second line adds
    the target encoder's forward (no grad) over the same views to the bare cost: an encoder
    pass every BYOL-style method needs (about a third of a fwd+bwd), so that line's ratio is
    what heads, losses, regularisers, optimizer, EMA update and logging add to the encoder.
(c) end-to-end epoch of ``byol_uniform`` on ``synthetic`` (data, augmentation, steps):
    ``data.on_device: true`` + batched augmentation vs a DataLoader with workers
    (``augment.path: cpu``, ``data.workers: 2``); the loader is wrapped (``_TimedLoader``) to
    time the last of two epochs from its first request to its exhaustion.

(e) the collapse signal, for each script after its (b) line: what ``proj_std`` (``common.evaluate.projection_std``
    on the online projections [batch, model.proj_dim] that the script's loss returns at every forward, and the
    running max ``Run.step_done`` keeps) costs, median of 10 x ``--repeats`` calls on the device, as a share of (b)'s
    full step.

(d) ``--mhe``: what BYOL-MHE's energy (Eq. 10) adds to a training step, alone: one optimizer step of
    ``byol_mhe_loss`` (the script's step function: online f, g, q on two views, the target's forward,
    the loss) with and without the MHE term, plus its backward, LARS and the EMA update, on views made
    beforehand; then the energy term alone (fwd+bwd), in all and per layer. The heads have the paper's
    sizes (4096 hidden, 256 out: the projector's first layer is 4096 x 512 for ResNet-18, 4096 x 2048 for
    ResNet-50); ``--arch``, ``--parts``, ``--power`` choose the setting; times are medians, interleaved.

Each ratio is the slow time over the fast one (or full over bare); (a) and (c) times are medians
of ``--repeats``, (b)'s the fastest of ``--repeats`` iterations after ``--warmup`` (noise on a
shared machine only adds time, so the minimum is the stable estimate of a fixed amount of work). On a
GPU the lines also give images/s and the full step's rate as a fraction of the encoder-only rate. ``--set``
passes config overrides to every script run of (b) and (c), e.g. ``precision=bf16`` or ``compile=true``.
"""
import argparse
import contextlib
import functools
import importlib
import io
import statistics
import sys
import tempfile
import time
from copy import deepcopy
from unittest import mock

import torch

from common import data, dist, loaders
from common.augment import ViewMaker, cpu_view, view_specs
from common.config import BASE, Cfg, parse
from common.ema import EMA
from common.models import maybe_compile, resnet
from common.optim import build, param_groups
from common.run import Run

SCRIPTS = ("byol_uniform", "byol_mhe", "msbreg", "raft", "decorr_nostopgrad", "center_penalty")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, dev, repeats, warmup=1, reduce=statistics.median):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return reduce(times)


# ---------------------------------------------------------------------------- (a)
def bench_augment(images, size, dev, repeats, views=2):
    """images/s of the batched path on ``dev`` and of the per-image CPU path (up to 512 images),
    making ``views`` views of each image (2: BYOL; 8: MSBReg's largest K)."""
    mean, std = data.stats("synthetic")
    aug = Cfg.wrap(deepcopy(BASE["augment"]))
    maker = ViewMaker(aug, views, size, mean, std, dev, seed=0)
    cpu = [cpu_view(size, s, mean, std) for s in view_specs(aug, views)]
    n_cpu = min(len(images), 512)
    on_dev = images.to(dev)
    t_batched = timeit(lambda: maker(on_dev), dev, repeats)
    t_cpu = timeit(lambda: [[t(img) for t in cpu] for img in images[:n_cpu]], torch.device("cpu"), repeats)
    return len(images) / t_batched, n_cpu / t_cpu


# ---------------------------------------------------------------------------- running a script
class _CachedViews(ViewMaker):
    """A script's ``ViewMaker`` that makes the first batch's views once and returns them at every call.
    Each call first runs ``between(views)`` (the bare encoder's timings, so that they interleave with the
    script's steps) and records, after a device sync, its start in ``starts`` and its end in ``ends``."""

    def __init__(self, made, between, *args, **kw):
        super().__init__(*args, **kw)
        self.cache, self.between, self.starts, self.ends = None, between, [], []
        made.append(self)

    def __call__(self, batch):
        _sync(self.device)
        self.starts.append(time.perf_counter())
        if self.cache is None:
            self.cache = super().__call__(batch)
        self.between(self.cache)
        _sync(self.device)
        self.ends.append(time.perf_counter())
        return self.cache


class _TimedLoader:
    """Wraps a training loader; appends each epoch's time (first request to exhaustion) to ``times``."""

    def __init__(self, loader, dev, times):
        self.loader, self.dev, self.times = loader, dev, times

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        _sync(self.dev)
        t = time.perf_counter()
        yield from self.loader
        _sync(self.dev)
        self.times.append(time.perf_counter() - t)


def run_script(name, overrides, between=None, time_epochs=False, config=None):
    """Run ``name``'s own ``train(cfg)`` in this process on tiny ``synthetic`` settings plus ``overrides``
    (``key=value`` strings; ``config``: a YAML file read first), its output swallowed. Returns
    ``(cfg, view_makers, epoch_times)``; with ``between`` (cfg -> a function of the views) the makers are
    ``_CachedViews`` calling it at every step (their ``starts``/``ends``/``cache`` hold the per-step record)."""
    script = importlib.import_module(name)
    made, epochs = [], []
    with tempfile.TemporaryDirectory() as out, contextlib.ExitStack() as stack:
        cfg = parse([*(["--config", str(config)] if config else []), "--set", f"out_dir={out}", "name=bench",
                     "data.name=synthetic", "optim.warmup_epochs=0", "eval.every=0", "eval.linear=none",
                     "eval.knn_k=[5]", "log.every=1000000", "log.progress=false", "checkpoint.every=1000000",
                     *overrides],
                    script.DEFAULTS, getattr(script, "CHOICES", None), method=name)
        if between is not None:
            timed_views = functools.partial(_CachedViews, made, between(cfg))
            stack.enter_context(mock.patch.object(Run, "views", lambda run, n: timed_views(
                cfg.augment, n, cfg.data.image_size, *data.stats(cfg.data), run.device, dist.rank_seed(cfg.seed))))
        if time_epochs:
            loader = loaders.train_loader
            timed = lambda *a: (lambda ld, s: (_TimedLoader(ld, a[3], epochs), s))(*loader(*a))  # noqa: E731
            stack.enter_context(mock.patch.object(loaders, "train_loader", timed))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        torch.compiler.reset()  # with compile=true: no compiled code or recompile budget carried between runs
        try:
            script.train(cfg)
        except dist.Stopped:  # checkpoint.stop_after_step
            pass
    return cfg, made, epochs


def _tiny(args, images):
    """Overrides shared by (b) and (c): synthetic data at --size, --width, --batch, the device."""
    return [f"device={args.device}", f"data.synthetic.train_size={images}", "data.synthetic.test_size=64",
            f"data.synthetic.size={args.size}", f"data.image_size={args.size}", f"model.width={args.width}",
            f"optim.batch_size={args.batch}", *args.set]


# ---------------------------------------------------------------------------- (b)
def bench_step(name, args):
    """Fastest time of one full iteration of ``name``'s loop, of a bare encoder forward+backward on the same
    views, of the encoder's forward alone without grad (what an EMA target costs; None if the script has
    no EMA target), and the number of views. The bare timings run inside the script's loop, just before each
    of its iterations, so that both see the machine in the same state."""
    steps = args.warmup + args.repeats + 1  # n calls of the view maker = n - 1 measured iterations
    has_target = hasattr(importlib.import_module(name), "EMA")
    bare, target = [], []

    def between(cfg):  # the bare encoder of the script's resolved config, timed at each call on its views
        dev, m = dist.device(cfg), cfg.model
        encoder = resnet(m.arch, m.width, m.cifar_stem, m.norm, m.zero_init_residual)[0]
        encoder = encoder.to(dev, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        maybe_compile(encoder, cfg)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

        def encoder_step(views):
            for x in views:
                with amp:
                    y = encoder(x)
                y.float().sum().backward()
            encoder.zero_grad(set_to_none=True)

        def target_forward(views):
            with torch.no_grad(), amp:
                for x in views:
                    encoder(x)

        def run(views):
            bare.append(timeit(lambda: encoder_step(views), dev, 1, 0))
            if has_target:
                target.append(timeit(lambda: target_forward(views), dev, 1, 0))
        return run

    _, (views,), _ = run_script(name, [*_tiny(args, steps * args.batch), "data.on_device=true", "optim.epochs=1",
                                       f"checkpoint.stop_after_step={steps}"], between=between)
    iterations = [b - a for a, b in zip(views.ends, views.starts[1:])][args.warmup:]
    return (min(iterations), min(bare[args.warmup:]), min(target[args.warmup:]) if has_target else None,
            len(views.cache))


# ---------------------------------------------------------------------------- (e)
def bench_signal(name, args):
    """Median time of the collapse signal of ``name``'s step: ``projection_std`` of [--batch, model.proj_dim]
    projections (fp32, on the device) and the running max of ``Run.step_done``; returns (seconds, proj_dim)."""
    from common.evaluate import projection_std
    script = importlib.import_module(name)
    cfg = parse(["--set", *_tiny(args, args.batch)], script.DEFAULTS, getattr(script, "CHOICES", None), method=name)
    dev, d = torch.device(args.device), cfg.model.proj_dim
    z, best = torch.randn(args.batch, d, device=dev), torch.zeros((), device=dev)
    return timeit(lambda: torch.maximum(best, projection_std(z)), dev, 10 * args.repeats, warmup=3), d


# ---------------------------------------------------------------------------- (c)
def bench_epoch(args, workers=2):
    """Time of byol_uniform's second epoch: data on the device vs a DataLoader with ``workers`` (cpu path)."""
    common = [*_tiny(args, args.epoch_images), "optim.epochs=2"]
    on_device = run_script("byol_uniform", [*common, "data.on_device=true"], time_epochs=True)[2][-1]
    loader = run_script("byol_uniform", [*common, "augment.path=cpu", f"data.workers={workers}"],
                        time_epochs=True)[2][-1]
    return on_device, loader


# ---------------------------------------------------------------------------- (d)
def bench_mhe(args):
    """Median times of a BYOL step without / with the MHE term (``byol_mhe_loss``), of the term alone and of
    each layer's energy, and the with/without ratio (see (d))."""
    import byol_mhe as bm

    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = parse(["--set", f"model.arch={args.arch}", f"model.width={args.width}", f"mhe.power={args.power}",
                 f"mhe.layers=[{','.join(args.parts)}]"], bm.DEFAULTS, method="byol_mhe")
    cfg = bm.check_mhe(cfg)
    online = bm.Online(cfg.model).to(dev)
    target = deepcopy(torch.nn.Sequential(online.f, online.g))
    ema = EMA(target, torch.nn.Sequential(online.f, online.g))
    opt = build(cfg.optim, param_groups([online], 1e-6), 0.1)
    layers = bm.mhe_layers(online, cfg.mhe.layers)
    x1, x2 = (torch.randn(args.batch, 3, args.size, args.size, device=dev) for _ in range(2))

    def step(weight):
        loss, _ = bm.byol_mhe_loss(online, target, x1, x2, layers, Cfg({**cfg.mhe, "weight": weight}))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(0.99)

    def mhe_only(modules):
        bm.mhe_loss(modules, cfg.mhe.power).backward()
        opt.zero_grad(set_to_none=True)

    runs = {"byol": lambda: step(0.0), "+mhe": lambda: step(cfg.mhe.weight), "mhe": lambda: mhe_only(layers)}
    runs.update({f"mhe {k} {tuple(m.weight.shape)}": (lambda m=m: mhe_only({"l": m})) for k, m in layers.items()})
    times = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for k, fn in runs.items():
            times[k].append(timeit(fn, dev, 1, 0))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["ratio"] = out["+mhe"] / out["byol"]
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    for flag, name in (("--gpu-check", "gpu_check"), ("--at-scale", "at_scale")):
        if flag in argv:
            return importlib.import_module(f"common.tools.{name}").main([a for a in argv if a != flag])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32, help="image size (synthetic data and views)")
    ap.add_argument("--batch", type=int, default=64, help="batch size of (a), (b), (c)")
    ap.add_argument("--width", type=int, default=64,
                    help="ResNet width for (b), (c): 64 = torchvision's, the scripts' default; 16 for a quick run")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats / steps ((a), (c): median; (b): fastest)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before (b)'s repeats")
    ap.add_argument("--epoch-images", type=int, default=1024, help="images per epoch in (c)")
    ap.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS, help="scripts for (b)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", action="extend",
                    help="config overrides for (b) and (c), e.g. precision=bf16 channels_last=true compile=true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mhe", action="store_true", help="(d) only: BYOL-MHE's energy term in a training step")
    ap.add_argument("--arch", default="resnet18", help="(d): the encoder")
    ap.add_argument("--parts", nargs="+", default=["projector", "predictor"], help="(d): mhe.layers")
    ap.add_argument("--power", default="a2", help="(d): mhe.power")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    if not gpu:  # the allocator of the scripts' CPU runs (dist.launch), which (b) and (c) run in this process
        dist.keep_freed_memory()
    if args.mhe:
        res = bench_mhe(args)
        print(f"(d) {args.arch} width {args.width}, batch {args.batch} at {args.size}x{args.size}, MHE {args.power} "
              f"on {' + '.join(args.parts)}, {dev}, median of {args.repeats}", flush=True)
        for k, v in res.items():
            print(f"    {k:32s} {v:.3f}" + ("" if k == "ratio" else " s"), flush=True)
        return
    images, _ = data.make_synthetic(args.batch, args.size, 10, seed=0)
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if gpu else f'{torch.get_num_threads()} threads'}), "
          f"images {args.size}x{args.size}, batch {args.batch}, ResNet width {args.width}, median of "
          f"{args.repeats}{', overrides ' + ' '.join(args.set) if args.set else ''}", flush=True)

    fast, slow = bench_augment(images, args.size, dev, args.repeats)
    print(f"(a) augmentation, 2 BYOL views: batched {fast:,.0f} img/s | per-image torchvision v2 {slow:,.0f} img/s "
          f"| ratio {fast / slow:.2f}x", flush=True)
    fast8, slow8 = bench_augment(images, args.size, dev, args.repeats, views=8)
    print(f"(a) augmentation, 8 MSBReg views: batched {fast8:,.0f} img/s | per-image torchvision v2 {slow8:,.0f} "
          f"img/s | ratio {fast8 / slow8:.2f}x | batched K=8 costs {slow / fast8:.2f}x the per-image K=2 time",
          flush=True)

    for name in args.scripts:
        t_full, t_enc, t_target, k = bench_step(name, args)
        rates = (f" | {args.batch / t_full:,.0f} vs {args.batch / t_enc:,.0f} img/s, full step at "
                 f"{t_enc / t_full:.0%} of the encoder-only rate" if gpu else "")
        print(f"(b) {name:<18} full step {t_full * 1e3:8.1f} ms | bare encoder fwd+bwd on the same {k} views "
              f"{t_enc * 1e3:8.1f} ms{rates} | ratio {t_full / t_enc:.2f}x", flush=True)
        if t_target is not None:
            print(f"    {name:<18} + the EMA target's encoder forward {t_target * 1e3:.1f} ms: full step over "
                  f"encoder fwd+bwd + target forward {(t_enc + t_target) * 1e3:.1f} ms | ratio "
                  f"{t_full / (t_enc + t_target):.2f}x", flush=True)
        t_signal, d = bench_signal(name, args)
        print(f"(e) {name:<18} collapse signal, proj_std of [{args.batch}, {d}] and its running max "
              f"{t_signal * 1e3:.4f} ms | full step {t_full * 1e3:.1f} ms | share {100 * t_signal / t_full:.4f}%",
              flush=True)

    t_dev, t_loader = bench_epoch(args)
    rates = (f" | {args.epoch_images / t_dev:,.0f} vs {args.epoch_images / t_loader:,.0f} img/s" if gpu else "")
    print(f"(c) byol_uniform epoch of {args.epoch_images} images: data on device {t_dev:.2f} s | DataLoader, 2 "
          f"workers, augment.path cpu {t_loader:.2f} s{rates} | ratio {t_loader / t_dev:.2f}x", flush=True)


if __name__ == "__main__":
    main()
