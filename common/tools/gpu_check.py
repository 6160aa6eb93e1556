"""Everything GPU-only in one run, for the first session on a GPU (under 8 minutes on an H100):

    python -m common.tools.benchmark --gpu-check [--out gpu_check.json] [--set channels_last=true]
    python -m common.tools.benchmark --gpu-check --dry        # on the CPU, tiny, seconds (the test suite runs it)

1. ``pytest -m cuda`` (tests/test_cuda.py, a subprocess, capped at ``--pytest-s``): bf16 and fp16 autocast,
   channels_last, compile, data.on_device and exact resume on the GPU;
2. BYOL (``byol_uniform.py`` with λ_uni = 0), ResNet-18 with the CIFAR stem at 32 px, batch 256, bf16, data on
   the device: images/s over its second epoch of 50,000 synthetic images, and common.tools.benchmark's (b):
   one full step over a bare encoder forward+backward on the same views (the step's rate as a fraction of the
   encoder-only rate);
3. the largest batch of one BYOL training step (the script's ``byol_uniform_loss``: online f, g, q on two views,
   the target's forward, backward, LARS, EMA; bf16 autocast; 4096-256 heads) that fits the GPU at 224 px, for
   ResNet-18 and ResNet-50: doubling from 1, then bisection, a CUDA out-of-memory error meaning "does not fit"
   (each search capped at ``--search-s``); with the peak memory at each batch tried and the slope between the
   two largest that fit (activation memory per image, measured, to set beside the README's computed one).

One line per result, and ``--out`` (JSON) with every number. ``--dry``: the same code on the CPU at toy sizes;
the cuda tests run there on the CPU (``ONEFILE_TEST_DEVICE=cpu``, a quick subset) and the batch search meets a
pretend memory limit of 5 images, so that the out-of-memory path and the bisection run too.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from argparse import Namespace
from copy import deepcopy
from pathlib import Path

import torch

from common.config import Cfg, parse
from common.ema import EMA
from common.optim import build, param_groups

ROOT = Path(__file__).resolve().parents[2]
DRY_MEMORY_LIMIT = 5  # --dry: a step of more images than this raises a (pretend) CUDA out-of-memory error
DRY_TESTS = "data_on_device or (channels_last and byol_uniform)"  # --dry: the cuda tests run on the CPU


def cuda_tests(dry, timeout):
    """``pytest -m cuda`` in a subprocess: counts of passed/failed/skipped/errors, exit code, seconds."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    env = {**os.environ, **({"ONEFILE_TEST_DEVICE": "cpu", "OMP_NUM_THREADS": "1"} if dry else {})}
    t = time.perf_counter()
    try:
        p = subprocess.run([*cmd, *(["-k", DRY_TESTS] if dry else [])], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        out, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", out.splitlines()[-1]
                                                if out.strip() else "")}
    failed = [line.split(" - ")[0] for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0), "skipped": counts.get("skipped", 0),
            "errors": counts.get("errors", counts.get("error", 0)), "rc": rc, "failures": failed,
            "seconds": round(time.perf_counter() - t, 1)}


def byol_epoch(dry, overrides):
    """BYOL ResNet-18 at CIFAR geometry: images/s of the second epoch (data on the device) and benchmark (b)'s
    full step vs bare encoder fwd+bwd on the same views."""
    from common.tools import benchmark
    dev = "cpu" if dry else "cuda"
    size, batch, width, images = (16, 16, 4, 64) if dry else (32, 256, 64, 50_000)
    sets = [] if dry else ["precision=bf16"]
    sets += ["loss.lambda_uni=0", "model.arch=resnet18", "model.cifar_stem=true", *overrides]
    args = Namespace(device=dev, size=size, batch=batch, width=width, warmup=1 if dry else 5,
                     repeats=1 if dry else 20, set=sets)
    epoch = benchmark.run_script("byol_uniform", [*benchmark._tiny(args, images), "optim.epochs=2",
                                                  "data.on_device=true"], time_epochs=True)[2][-1]
    t_full, t_enc, t_target, views = benchmark.bench_step("byol_uniform", args)
    steps = images // batch
    return {"images_per_s": steps * batch / epoch, "step_images_per_s": batch / t_full,
            "encoder_only_images_per_s": batch / t_enc, "step_over_encoder": t_full / t_enc,
            "step_over_encoder_and_target": t_full / (t_enc + t_target), "epoch_s": epoch,
            "settings": f"ResNet-18 CIFAR stem, {size} px, batch {batch}, width {width}, {images} images, "
                        f"{' '.join(sets)}"}


def largest_batch(fits, cap, deadline, start=2):
    """The largest b <= cap with ``fits(b)``, assuming fitting is monotone: double from ``start`` (BatchNorm:
    2 images at least) until one does not fit, then bisect; stops at ``deadline`` (time.monotonic) with what it
    knows. Returns (b, exact); b = 0: not even ``start`` fits."""
    lo, hi = 0, None  # lo fits (0: none yet), hi does not
    b = start
    while b <= cap and time.monotonic() < deadline:
        if not fits(b):
            hi = b
            break
        lo, b = b, 2 * b
    if hi is None or lo == 0:
        return lo, hi is not None  # the cap or the deadline came first: at least lo
    while hi - lo > 1 and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi - lo == 1


def batch_search(arch, dry, seconds, overrides=()):
    """Largest BYOL training batch at 224 px (bf16) for ``arch`` on the GPU (--dry: 16 px, width 4, CPU, the
    pretend limit). Returns the batch, whether it is exact, and the peak memory (GiB) of every batch tried."""
    import byol_uniform as bu
    dev = torch.device("cpu" if dry else "cuda")
    size = 16 if dry else 224
    cfg = parse(["--set", f"model.arch={arch}", "model.cifar_stem=false", f"model.width={4 if dry else 64}",
                 "model.proj_hidden=4096", "model.proj_dim=256", "model.pred_hidden=4096", *overrides],
                bu.DEFAULTS, method="byol_uniform")
    torch.manual_seed(0)
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    online = bu.Online(cfg.model).to(dev, memory_format=fmt)
    target = deepcopy(torch.nn.Sequential(online.f, online.g))
    ema = EMA(target, torch.nn.Sequential(online.f, online.g))
    opt = build(cfg.optim, param_groups([online], 1e-6), 0.1)
    peaks = {}

    def fits(b):
        try:
            if dry and b > DRY_MEMORY_LIMIT:
                raise torch.cuda.OutOfMemoryError(f"(pretend) {b} images do not fit")
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            x1, x2 = (torch.randn(b, 3, size, size, device=dev).contiguous(memory_format=fmt) for _ in range(2))
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss, _ = bu.byol_uniform_loss(online, target, x1, x2, Cfg({**cfg.loss, "lambda_uni": 0.0}))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(0.99)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                peaks[b] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
            else:
                peaks[b] = 0.0
            return True
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            return False
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    b, exact = largest_batch(fits, 16 if dry else 16384, time.monotonic() + seconds)
    fit = sorted(peaks)
    slope = ((peaks[fit[-1]] - peaks[fit[-2]]) / (fit[-1] - fit[-2]) * 1024) if len(fit) > 1 else None
    params = sum(p.numel() for p in online.parameters())
    return {"batch": b, "exact": exact, "image_size": size, "params": params, "peak_gib": peaks,
            "mib_per_image": slope}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.tools.benchmark --gpu-check",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="on the CPU, toy sizes, seconds (the test suite's run)")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file of every number")
    ap.add_argument("--set", nargs="+", default=[], action="extend", metavar="KEY=VALUE",
                    help="config overrides for parts 2 and 3, e.g. channels_last=true")
    ap.add_argument("--pytest-s", type=float, default=270, help="cap of part 1 (seconds)")
    ap.add_argument("--search-s", type=float, default=60, help="cap of each batch search of part 3 (seconds)")
    args = ap.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        sys.exit("error: --gpu-check needs a CUDA device (--dry runs its code on the CPU)")
    t0 = time.perf_counter()
    dev = "cpu (--dry)" if args.dry else torch.cuda.get_device_name()
    res = {"device": dev, "torch": torch.__version__, "dry": args.dry, "overrides": args.set}
    print(f"gpu-check on {dev}, torch {torch.__version__}", flush=True)

    c = res["cuda_tests"] = cuda_tests(args.dry, args.pytest_s)
    print(f"cuda tests: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped "
          f"(exit {c['rc']}, {c['seconds']:.0f} s){': ' + ', '.join(c['failures']) if c['failures'] else ''}",
          flush=True)

    e = res["byol_epoch"] = byol_epoch(args.dry, args.set)
    print(f"byol epoch: {e['images_per_s']:,.0f} img/s ({e['settings']}); one step {e['step_images_per_s']:,.0f} "
          f"img/s vs encoder fwd+bwd only {e['encoder_only_images_per_s']:,.0f} img/s: ratio "
          f"{e['step_over_encoder']:.2f}x ({e['step_over_encoder_and_target']:.2f}x with the target's forward "
          f"counted as encoder work)", flush=True)

    res["largest_batch"] = {}
    for arch in ("resnet18", "resnet50"):
        r = res["largest_batch"][arch] = batch_search(arch, args.dry, args.search_s, args.set)
        per = f", {r['mib_per_image']:.1f} MiB per image" if r["mib_per_image"] is not None else ""
        peak = r["peak_gib"].get(r["batch"])
        print(f"largest batch {arch}: {'' if r['exact'] else '>= '}{r['batch']} images at {r['image_size']} px, "
              f"BYOL step, bf16{' ' + ' '.join(args.set) if args.set else ''}"
              f"{f' (peak {peak:.1f} GiB{per})' if peak is not None and not args.dry else ''}", flush=True)
        if not args.dry:
            torch.cuda.empty_cache()

    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {args.out} ({res['seconds']:.0f} s in all)", flush=True)
    return res
