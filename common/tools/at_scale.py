"""Numbers to plan a cluster run with: memory per GPU and per rank, loader workers, evaluation time.

    python -m common.tools.benchmark --at-scale                     # every part (~10 min on 2 CPU cores)
    python -m common.tools.benchmark --at-scale --parts memory      # (a) only; also: hybrid, eval-memory, eval-time,
                                                                    # digest

Measured here (on the CPU; the same tensors on a GPU) or computed from stated formulas; each printed row says which.

(a) memory: for each paper config (``configs/<method>/*.yaml`` but ``fashion_mnist*``, ``_*`` bases and the 2-D toy
    data), grouped by geometry (method, image size, views, model): parameters (online, EMA target), optimizer
    state, and the activation memory per image of one training step. Measured: the script's own ``train(cfg)``
    runs one step on ``synthetic`` images at the config's size, arch, heads and views (fp32, one process,
    Decorr with one partition: its per-GPU count at 8 GPUs), with ``torch.autograd.graph.saved_tensors_hooks``
    around its forward and loss (``Run.autocast``) counting the bytes of every storage saved for backward
    (each storage once, parameters and buffers excluded), at a batch of 2 and of 4: per image = the difference / 2,
    fixed = what remains at 0 images. Computed: the largest batch per GPU in bf16 that fits C = 40 and 80 GiB,
    ``floor((0.9 C - 2 GiB - static - fixed/2) / (per_image/2))`` with ``static`` = 4 B x online parameters x 3
    (fp32 weights, gradients, DDP's gradient buckets) + 2 B x online parameters (autocast's bf16 copies) + the
    optimizer state + 4 B x target parameters; activations and the fixed part halved for bf16; the reserve
    (10% of C + 2 GiB) for the CUDA context, cuDNN/cuBLAS workspaces, NCCL, allocator fragmentation and the
    backward's transient gradients. Beside it the config's batch per GPU at 8 GPUs (``optim.batch_size`` / 8).
(b) hybrid: one loader worker's throughput (1 thread) on JPEGs of ImageNet's typical size (500 x 375, quality 75,
    written here): decode (the ImageFolder's loader), then per view random resized crop + flip to 224 px
    (``augment.path: hybrid``, ``ViewMaker.cpu_transforms``); measured. Workers per GPU, computed at a published
    encoder rate (``GPU_RATE``).
(c) eval-memory: per-rank memory of the kNN evaluation for the ImageNet configs, before and after sharding the
    bank over the ranks, at W = 1, 8, 64; computed (formulas in ``eval_memory``).
(d) eval-time: one evaluation's wall time as a fraction of a training epoch, per ImageNet config, and the final
    paper probe in epochs; computed (model in ``eval_time``).
(e) digest: the cost of a checkpoint's digest (the sha256 of its tensors, ``common.checkpoint``) for
    byol_uniform/imagenet_resnet50_300ep's checkpoint (online, EMA target, LARS momentum after one step, the
    augmentation RNG): save and read with and without it, and the file size; measured (fastest of 3; the file in
    the page cache).
"""
import argparse
import math
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

from common.config import BASE, Cfg, parse

ROOT = Path(__file__).resolve().parents[2]
GiB = 2 ** 30
# (b)'s encoder rate: NVIDIA DeepLearningExamples, ResNet50 v1.5 for PyTorch, "Training performance: NVIDIA DGX A100
# (8x A100 80GB)", 1 GPU, mixed precision: 2470 img/s (8 GPUs: 16621 img/s), pytorch-21.03 NGC container;
# https://github.com/NVIDIA/DeepLearningExamples/blob/master/PyTorch/Classification/ConvNets/resnet50v1.5/README.md
GPU_RATE = 2470
GPU_RATE_SOURCE = ("NVIDIA DeepLearningExamples ResNet50 v1.5 (PyTorch), DGX A100 80GB, 1 GPU, mixed precision: "
                   "2470 img/s")
SIZES = {"imagenet": (1_281_167, 50_000), "imagenet100": (126_689, 5_000)}  # (train N, val Q)
FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}  # D: the encoder's feature size (width 64)


# ---------------------------------------------------------------------------------------------- the configs
def paper_configs():
    """[(method, path, cfg)] of every paper config (see (a))."""
    import importlib

    from common.tools.benchmark import SCRIPTS
    out = []
    for method in SCRIPTS:
        mod = importlib.import_module(method)
        for path in sorted((ROOT / "configs" / method).glob("*.yaml")):
            if path.name.startswith(("fashion_mnist", "_")):
                continue
            cfg = parse(["--config", str(path)], mod.DEFAULTS, getattr(mod, "CHOICES", None), method)
            if cfg.data.name != "toy2d":
                out.append((method, path, cfg))
    return out


def views(method, cfg):
    return cfg.loss.K if method == "msbreg" else 2


def geometry(method, cfg):
    """What the memory of a step depends on: method (variant), image size, views, the model's sizes."""
    model = {k: v for k, v in cfg.model.items() if k not in ("sync_bn", "zero_init_residual")}
    return (method, cfg.get("loss", {}).get("variant"), cfg.data.image_size, views(method, cfg),
            repr(sorted(model.items())))


# ---------------------------------------------------------------------------------------------- (a)
def step_memory(method, path, cfg, batch):
    """One training step of ``method`` with ``path``'s geometry at ``batch`` on the CPU (fp32): bytes saved for
    backward (storages, each once, parameters and buffers excluded), parameters of the online network and of
    the target, bytes of the optimizer's state."""
    import torch.nn as nn

    from common import checkpoint, evaluate
    from common.run import Run
    from common.tools.benchmark import run_script
    saved, objects = [], {}
    start, autocast = Run.resume_or_evaluate_init, Run.autocast

    def record_start(run, encoder, diagnostics=None, **objs):
        objects.update(objs)
        return start(run, encoder, diagnostics, **objs)

    def counting_autocast(run):
        stack = ExitStack()
        stack.enter_context(autocast(run))
        own = {t.untyped_storage().data_ptr() for o in objects.values() if isinstance(o, nn.Module)
               for t in (*o.parameters(), *o.buffers())}
        seen = {}
        saved.append(seen)

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() and s.data_ptr() not in own:
                seen[s.data_ptr()] = s.nbytes()
            return t
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        return stack

    size = cfg.data.image_size
    overrides = ["device=cpu", f"data.synthetic.size={size}", f"data.image_size={size}",
                 f"data.synthetic.train_size={batch}", "data.synthetic.test_size=2", "data.on_device=true",
                 "data.workers=0", "data.val_split=false", "augment.path=batched", f"optim.batch_size={batch}",
                 "optim.accum_steps=1", "optim.epochs=1", "checkpoint.stop_after_step=1", "precision=fp32",
                 "channels_last=false", "compile=false", "eval.knn_k=[1]", "dist.nproc=1",
                 *(["loss.partitions=1"] if method == "decorr_nostopgrad" else [])]
    with mock.patch.object(Run, "resume_or_evaluate_init", record_start), \
            mock.patch.object(Run, "autocast", counting_autocast), \
            mock.patch.object(checkpoint, "save", lambda *a, **k: None), \
            mock.patch.object(evaluate, "covariance_spectrum", lambda z: torch.ones(2, dtype=torch.float64)):
        run_script(method, overrides, config=path)  # (no checkpoint written, no SVD of the monitor's features)
    assert len(saved) == 1, len(saved)
    opt = objects["optimizer"]
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
    return {"saved": sum(saved[0].values()), "online": count(objects["online"]),
            "target": count(objects.get("target")), "opt_state": state}


def largest_bf16_batch(m, capacity_gib):
    """(a)'s formula: the largest per-GPU batch in bf16 that fits ``capacity_gib``."""
    static = 4 * 3 * m["online"] + 2 * m["online"] + m["opt_state"] + 4 * m["target"]
    free = 0.9 * capacity_gib * GiB - 2 * GiB - static - m["fixed"] / 2
    return max(0, math.floor(free / (m["per_image"] / 2)))


def memory_rows(skip=0, stop=None):
    groups = {}
    for method, path, cfg in paper_configs():
        groups.setdefault(geometry(method, cfg), []).append((method, path, cfg))
    print("| configs | arch, px, views | params online / target (M) | optimizer state (MiB) | activations per image, "
          "fp32 (MiB, measured) | fixed (MiB) | largest batch per GPU, bf16, 40 / 80 GiB (computed) | "
          "config's batch per GPU at 8 GPUs |")
    print("|---|---|---|---|---|---|---|---|")
    for members in list(groups.values())[skip:stop]:  # (a part of the groups: several processes at once)
        method, path, cfg = members[0]
        t = time.perf_counter()
        two, four = (step_memory(method, path, cfg, b) for b in (2, 4))
        m = {**four, "per_image": (four["saved"] - two["saved"]) / 2}
        m["fixed"] = two["saved"] - 2 * m["per_image"]
        names = ", ".join(f"{p.parent.name}/{p.stem}" for _, p, _ in members)
        per_gpu = sorted({c.optim.batch_size / 8 for _, _, c in members})
        print(f"| {names} | {cfg.model.arch}{' CIFAR stem' if cfg.model.cifar_stem else ''}, {cfg.data.image_size}, "
              f"{views(method, cfg)} | {m['online'] / 1e6:.1f} / {m['target'] / 1e6:.1f} | "
              f"{m['opt_state'] / 2 ** 20:.0f} | {m['per_image'] / 2 ** 20:.1f} | {m['fixed'] / 2 ** 20:.1f} | "
              f"{largest_bf16_batch(m, 40):,} / {largest_bf16_batch(m, 80):,} | "
              f"{', '.join(f'{b:g}' for b in per_gpu)} |  <!-- {time.perf_counter() - t:.0f} s -->", flush=True)


# ---------------------------------------------------------------------------------------------- (b)
def write_jpegs(folder, n=32, seed=0):
    """``n`` JPEGs of 500 x 375, quality 75 (ImageNet's typical size): the synthetic shapes at 500 px, cut to
    375 rows, with pixel noise (luma std 40, each channel 12) so that the files are about as large as
    ImageNet's (~110 KB a JPEG on average: ~138 GB for 1.28 M training images), not as small as flat shapes'.
    Decoding time grows with the bits to decode. Returns the paths and the mean file size in KiB."""
    from PIL import Image

    from common.data import make_synthetic
    images, _ = make_synthetic(n, 500, 10, seed)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i, img in enumerate(images[:, :, :375]):
        noise = 40 * torch.randn((1, *img.shape[1:]), generator=g) + 12 * torch.randn(img.shape, generator=g)
        noisy = (img.float() + noise).clamp(0, 255).to(torch.uint8)
        paths.append(Path(folder) / f"{i}.jpg")
        Image.fromarray(noisy.permute(1, 2, 0).numpy()).save(paths[-1], quality=75)
    return paths, statistics.mean(p.stat().st_size for p in paths) / 1024


def hybrid_rows(repeats=5):
    from common import data
    from common.augment import ViewMaker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's torch runs on one thread
    try:
        with tempfile.TemporaryDirectory() as d:
            paths, kib = write_jpegs(d)
            aug = Cfg.wrap({**BASE["augment"], "path": "hybrid"})
            crop = ViewMaker(aug, 1, 224, *data.stats("synthetic"), "cpu", 0).cpu_transforms()[0]
            decoded = [data._rgb_uint8(p) for p in paths]
            t_decode = min(_time(lambda: [data._rgb_uint8(p) for p in paths]) for _ in range(repeats)) / len(paths)
            t_view = min(_time(lambda: [crop(x) for x in decoded]) for _ in range(repeats)) / len(paths)
    finally:
        torch.set_num_threads(threads)
    print(f"measured: {len(paths)} JPEGs 500x375 q75 (mean {kib:.0f} KiB), one worker, 1 thread: decode "
          f"{t_decode * 1e3:.1f} ms/image, crop + flip to 224 px {t_view * 1e3:.2f} ms/view (thread CPU time, "
          f"fastest of {repeats})")
    print(f"computed: GPU rate {GPU_RATE_SOURCE}; an SSL image costs K views x (fwd+bwd) + K target forwards "
          "(1/3 each) on methods with an EMA target")
    print("| views K (methods) | worker images/s (measured) | GPU images/s (computed) | workers per GPU (computed) |")
    print("|---|---|---|---|")
    for k, who, target in ((2, "BYOL, +uniformity, +MHE, RAFT", True), (2, "Decorr, centre penalty", False),
                           (4, "MSBReg K=4", True), (8, "MSBReg K=8", True)):
        worker = 1 / (t_decode + k * t_view)
        gpu = GPU_RATE / (k * (4 / 3 if target else 1))
        print(f"| {k} ({who}) | {worker:.0f} | {gpu:.0f} | {math.ceil(gpu / worker)} |")
    return t_decode, t_view


def _time(fn):
    """CPU time of this thread running ``fn``: a worker's own work, which on a shared machine wall time is not
    (other jobs' time slices count there); a loader worker has a core of its own on a GPU node."""
    t = time.thread_time()
    fn()
    return time.thread_time() - t


# ---------------------------------------------------------------------------------------------- (c), (d)
def imagenet_configs():
    return [(m, p, c) for m, p, c in paper_configs() if c.data.name in SIZES]


def eval_memory(n, q, d, w, k):
    """Per-rank bytes of one kNN evaluation (float32 features), from how it holds them:
    before (every rank the whole bank): the gathered bank N x D and, at the gather's peak, its W pieces as well
    (~2 N x D), plus the test features Q x D: 4 (2ND + QD), whatever W;
    after (the bank sharded): this rank's ceil(N/W) x D, the whole test set Q x D (queries gathered), and per query
    chunk of 1024 the merge buffers of W x k candidates (similarity float32 + index int64):
    4 (ceil(N/W) D + QD) + 1024 W k 12."""
    before = 4 * (2 * n * d + q * d)
    after = 4 * (math.ceil(n / w) * d + q * d) + 1024 * w * k * 12
    return before, after


def eval_memory_rows():
    print("computed: per-rank memory of one kNN evaluation (GiB), before / after sharding the bank "
          "(common.tools.at_scale.eval_memory); the paper probe (eval.linear: paper, all ImageNet configs) caches "
          "no features")
    print("| dataset (N train, Q val) | encoder, D | k | before: any W | after: W = 1 | W = 8 | W = 64 |")
    print("|---|---|---|---|---|---|---|")
    seen = set()
    for _, _, cfg in imagenet_configs():
        key = (cfg.data.name, cfg.model.arch, max(cfg.eval.knn_k))
        if key in seen:
            continue
        seen.add(key)
        (n, q), d, k = SIZES[cfg.data.name], FEATURES[cfg.model.arch], max(cfg.eval.knn_k)
        after = [eval_memory(n, q, d, w, k)[1] / GiB for w in (1, 8, 64)]
        print(f"| {cfg.data.name} ({n:,}, {q:,}) | {cfg.model.arch}, {d} | {k} "
              f"| {eval_memory(n, q, d, 1, k)[0] / GiB:.2f} | {' | '.join(f'{a:.2f}' for a in after)} |")


def eval_time(method, cfg, has_target):
    """One evaluation's wall time in training epochs, and the final paper probe's, under one model: the GPU is
    the bottleneck (loaders keep up), an encoder forward costs 1/3 of its forward+backward (the backward ~2x
    the forward), heads and losses are negligible. A training image costs K (fwd+bwd) + K/3 (target forward,
    where there is an EMA target); the kNN evaluation a forward of each of the N train and Q val images (N + Q)/3;
    the paper probe ``linear_epochs`` x N/3 (forwards of augmented crops, frozen encoder) + Q/3."""
    (n, q), k = SIZES[cfg.data.name], views(method, cfg)
    step = n * k * (1 + (1 / 3 if has_target else 0))
    knn = (n + q) / 3 / step
    probe = (cfg.eval.linear_epochs * n / 3 + q / 3) / step if cfg.eval.linear == "paper" else 0.0
    return knn, probe


def eval_time_rows():
    import importlib
    print("computed: one kNN evaluation as a fraction of a training epoch, and the final paper probe, "
          "(common.tools.at_scale.eval_time: forward = 1/3 of fwd+bwd, GPU-bound)")
    print("| config | views K, EMA target | eval.every | one evaluation (epochs) | evaluation per epoch "
          "(amortised) | final probe (epochs; % of training) |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for method, path, cfg in imagenet_configs():
        has_target = hasattr(importlib.import_module(method), "EMA")
        knn, probe = eval_time(method, cfg, has_target)
        every = cfg.eval.every or cfg.optim.epochs
        row = (f"{views(method, cfg)}, {'yes' if has_target else 'no'} | {cfg.eval.every} | {knn:.3f} | "
               f"{knn / every:.2%} | {cfg.eval.linear} {cfg.eval.linear_epochs} ep: {probe:.1f}; "
               f"{probe / cfg.optim.epochs:.1%} |")
        rows.setdefault((method, row), []).append(path.stem)
    for (method, row), names in rows.items():  # configs with the same numbers share a row
        print(f"| {method}/{names[0]}{f' (+{len(names) - 1} more)' if len(names) > 1 else ''} | {row}")


# ---------------------------------------------------------------------------------------------- (e)
DIGEST_CONFIG = ROOT / "configs" / "byol_uniform" / "imagenet_resnet50_300ep.yaml"


def digest_cost(config=DIGEST_CONFIG, overrides=(), repeats=3):
    """{"digest", "save", "read" (with / without), "bytes"} of byol_uniform's checkpoint for ``config``: its models
    built as byol_uniform.py builds them, one LARS step on 4 images of 64 px (the momentum buffers), saved and read
    back ``repeats`` times with and without the digest (``save(with_digest=)``, ``read(verify=)``); fastest times."""
    from copy import deepcopy

    from common import checkpoint
    from common.augment import ViewMaker
    from common.optim import build, param_groups, scaled_lr

    import byol_uniform as b
    argv = ["--config", str(config), *(["--set", *overrides] if overrides else [])]
    cfg = parse(argv, b.DEFAULTS, getattr(b, "CHOICES", None), b.METHOD)
    online = b.Online(cfg.model)
    target = deepcopy(torch.nn.Sequential(online.f, online.g))
    opt = build(cfg.optim, param_groups([online], cfg.optim.weight_decay, cfg.optim.exclude_bias_norm),
                scaled_lr(cfg.optim))
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    b.byol_uniform_loss(online, target, x, x.flip(-1), cfg.loss)[0].backward()
    opt.step()
    views = ViewMaker(cfg.augment, 2, 64, (0.5,) * 3, (0.25,) * 3, "cpu", seed=0)
    state = checkpoint.snapshot(cfg, {"step": 1}, b.METHOD, scaler=torch.amp.GradScaler("cpu", enabled=False),
                                online=online, target=target, optimizer=opt, views=views)
    out = {"digest": min(_wall(lambda: checkpoint.digest(state)) for _ in range(repeats))}
    with tempfile.TemporaryDirectory() as d:
        for on in (False, True):
            path = Path(d) / f"last_{on}.pt"
            out[f"save_{on}"] = min(_wall(lambda path=path, on=on: checkpoint.save(state, path, with_digest=on))
                                    for _ in range(repeats))
            out[f"read_{on}"] = min(_wall(lambda path=path, on=on: checkpoint.read(path, verify=on))
                                    for _ in range(repeats))
            out[f"bytes_{on}"] = path.stat().st_size
    return out


def _wall(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def digest_rows():
    c = digest_cost()
    print(f"measured: byol_uniform/{DIGEST_CONFIG.stem}'s checkpoint, {c['bytes_False'] / 2 ** 20:.0f} MiB, fastest of "
          f"3, the file in the page cache; sha256 of the tensors alone {c['digest']:.2f} s "
          f"({c['bytes_False'] / c['digest'] / GiB:.1f} GiB/s)")
    print("| | without digest | with digest | cost |")
    print("|---|---|---|---|")
    for what, key in (("save (torch.save, fsync, rename)", "save"), ("read (torch.load)", "read")):
        print(f"| {what} | {c[f'{key}_False']:.2f} s | {c[f'{key}_True']:.2f} s | "
              f"+{c[f'{key}_True'] - c[f'{key}_False']:.2f} s |")
    print(f"| file size | {c['bytes_False']:,} B | {c['bytes_True']:,} B | +{c['bytes_True'] - c['bytes_False']} B |")
    return c


PARTS = {"memory": memory_rows, "hybrid": hybrid_rows, "eval-memory": eval_memory_rows, "eval-time": eval_time_rows,
         "digest": digest_rows}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.tools.benchmark --at-scale",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = ap.parse_args(argv)
    print(f"device cpu, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    for part in args.parts:
        print(f"\n## {part}", flush=True)
        PARTS[part]()
