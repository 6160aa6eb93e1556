"""What to check before trusting a GPU run (marked ``cuda``; skipped without a CUDA device):

    python -m pytest -q -m cuda                     # these tests alone
    python -m common.tools.benchmark --gpu-check    # these, then speed and the largest batch (one run, < 8 min)

Each script's training steps on the GPU under bf16 and fp16 autocast (finite, the first loss close to fp32's,
fp32 weights, the GradScaler saved), ``channels_last`` (the same first loss, weights stored channels-last),
``compile`` with inductor (the same first loss as eager), ``data.on_device`` (the batches of the DataLoader path,
element for element, and the same losses), and a run stopped and resumed on the GPU equal to the uninterrupted
one, bit for bit (and, before that, two uninterrupted runs equal to each other: if that fails, the GPU's kernels
are not deterministic and no resume can be exact). Other kernels (or precisions) are compared on the first step
(same weights, same views), to their round-off: fp32 on CUDA uses TF32 in convolutions (PyTorch's default), so
there it allows TF32's (``FP32_FIRST_LOSS_REL``). The later steps are not compared: training amplifies round-off
(on the CPU, a 1e-7 relative difference of the first loss grew to 4e-3 by the fourth step; TF32's to 4.5e-2).

``ONEFILE_TEST_DEVICE=cpu`` runs the same tests on the CPU: ``--gpu-check --dry`` does so for a quick subset so
that this file cannot rot on machines without a GPU.
"""
import json
import os

import pytest
import torch

from common import data, loaders
from common.augment import ViewMaker
from common.config import BASE, Cfg
from common.tools import benchmark

from scriptrun import Script

DEVICE = os.environ.get("ONEFILE_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")]

TINY = [f"device={DEVICE}", "data.synthetic.train_size=128", "data.synthetic.test_size=64", "data.synthetic.size=16",
        "data.image_size=16", "model.arch=resnet18", "model.cifar_stem=true", "model.width=8",
        "model.proj_hidden=64", "model.proj_dim=32", "model.pred_hidden=64", "optim.batch_size=32",
        "optim.epochs=1", "optim.warmup_epochs=0", "log.every=1", "eval.knn_k=[20]", "eval.linear=none"]
STEPS = 4
_runs = {}
# Round-off of the first loss of an fp32 run, relative. CPU: between the kernel sets of x86 CPUs (AVX-512, AVX2, no
# vector unit; channels_last vs contiguous, compile vs eager) measured at 10 u at most (u = 2^-24, float32's unit
# round-off: 6e-7), 1e-5 leaves a factor of 17. CUDA: cuDNN rounds the operands of fp32 convolutions to TF32 (u =
# 2^-11); rounding every conv's operands to TF32 moved the first loss by 0.7 u at most (on the CPU: raft's 3.3e-4),
# two runs rounding apart 1.4 u: 8 u = 4e-3 leaves a factor of 5. (The log's 6 decimals: 2e-6 absolute.)
FP32_FIRST_LOSS_REL = 8 * 2.0 ** -11 if DEVICE == "cuda" and torch.backends.cudnn.allow_tf32 else 1e-5


def _tiny(script):
    return [o for o in TINY if not (script == "decorr_nostopgrad" and o.startswith("model.pred_hidden"))]


def run(script, tmp_path_factory, *overrides, steps=STEPS):
    """``script``'s own train() on tiny synthetic settings for ``steps`` steps (cached per arguments):
    (per-step losses, last.pt)."""
    key = (script, overrides, steps)
    if key not in _runs:
        out = tmp_path_factory.mktemp(script)
        benchmark.run_script(script, [*_tiny(script), f"checkpoint.stop_after_step={steps}", f"out_dir={out}",
                                      "name=r", *overrides])
        folder = out / script / "r"
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        _runs[key] = ([m["loss"] for m in lines if "loss" in m],
                      torch.load(folder / "checkpoints" / "last.pt", weights_only=True, map_location="cpu"))
    return _runs[key]


def _flat(state):
    return torch.cat([v.double().flatten() for k, v in sorted(state.items()) if v.is_floating_point()])


def _finite(losses):
    return len(losses) == STEPS and all(map(torch.isfinite, torch.tensor(losses)))


def _check_low_precision(script, tmp_path_factory, precision):
    """Losses of ``STEPS`` steps finite, the first (same weights, same views) within 1e-2 of fp32's, the master
    weights and the EMA target fp32 and finite. Returns (losses, fp32 losses, checkpoint)."""
    fp32, _ = run(script, tmp_path_factory)
    low, ckpt = run(script, tmp_path_factory, f"precision={precision}")
    assert _finite(low), low
    # bf16's unit round-off is 2^-8 = 3.9e-3 (fp16's 2^-11): measured on the CPU the first loss moved by 1.8e-3 at
    # most (raft's, bf16; fp16 3.4e-4), fp32's TF32 on CUDA adds 4e-3 at most (FP32_FIRST_LOSS_REL): 1e-2 holds
    assert low[0] == pytest.approx(fp32[0], rel=1e-2), (fp32, low)
    for part in ("online", "target"):
        for k, v in ckpt.get(part, {}).items():
            assert v.dtype in (torch.float32, torch.int64) and torch.isfinite(v.float()).all(), (part, k, v.dtype)
    return low, fp32, ckpt


@pytest.mark.parametrize("script", benchmark.SCRIPTS)
def test_bf16_autocast_steps_finite_close_to_fp32(script, tmp_path_factory):
    """bf16 autocast: as above (each step's update made from bf16 activations and gradients; the later losses are
    not held to fp32's: training amplifies the first step's difference, to 3% and more by the fourth step on the
    CPU, more than round-off bounds)."""
    _check_low_precision(script, tmp_path_factory, "bf16")


@pytest.mark.parametrize("script", benchmark.SCRIPTS)
def test_fp16_autocast_with_grad_scaler(script, tmp_path_factory):
    """fp16 autocast + GradScaler (GPUs without bf16): as above; the scaler's state is in the checkpoint, its scale
    2^16 halved once per step whose gradients overflowed (that step skipped)."""
    _, _, ckpt = _check_low_precision(script, tmp_path_factory, "fp16")
    skipped = 16 - torch.tensor(ckpt["scaler"]["scale"]).log2().item()
    assert skipped in range(STEPS + 1), ckpt["scaler"]


@pytest.mark.parametrize("script", benchmark.SCRIPTS)
def test_channels_last_equals_contiguous(script, tmp_path_factory):
    """channels_last: the first loss of the contiguous run (other conv kernels: to their round-off), later losses
    finite, and the encoder's conv weights are held channels-last (the option took effect)."""
    ref, _ = run(script, tmp_path_factory)
    cl, ckpt = run(script, tmp_path_factory, "channels_last=true")
    assert cl[0] == pytest.approx(ref[0], rel=FP32_FIRST_LOSS_REL, abs=2e-6) and _finite(cl), (ref, cl)
    convs = [v for k, v in ckpt["online"].items() if k.startswith("f.") and v.dim() == 4 and v.shape[-1] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)


def test_compile_with_inductor_equals_eager(tmp_path_factory):
    """compile: true with the default backend (inductor: Triton kernels on CUDA): the first loss of eager mode
    (fused kernels reorder sums, other conv layouts: to their round-off), later losses finite, and the run's
    evaluation (eval mode, other shapes) works."""
    torch._dynamo.reset()
    eager, _ = run("byol_uniform", tmp_path_factory)
    compiled, ckpt = run("byol_uniform", tmp_path_factory, "compile=true")
    assert compiled[0] == pytest.approx(eager[0], rel=FP32_FIRST_LOSS_REL, abs=2e-6), (eager, compiled)
    assert _finite(compiled) and all(torch.isfinite(v.float()).all() for v in ckpt["online"].values())


def test_data_on_device_gives_the_dataloader_batches(tmp_path_factory):
    """data.on_device: the batches cut on the device equal the DataLoader path's, element for element, over
    a whole epoch; and a run with it has the DataLoader run's losses."""
    dev = torch.device(DEVICE)
    images, labels = data.make_synthetic(64, 16, 10, seed=0)
    cfg = Cfg.wrap({**BASE, "data": {**BASE["data"], "on_device": True}, "optim": {"batch_size": 16}})
    views = ViewMaker(BASE["augment"], 2, 16, *data.stats("synthetic"), dev, seed=0)
    on_dev, sampler = loaders.train_loader(data.TensorImages(images, labels), cfg, views, dev)
    cfg.data.on_device = False
    host, sampler2 = loaders.train_loader(data.TensorImages(images, labels), cfg, views, dev)
    sampler.set_epoch(1), sampler2.set_epoch(1)
    pairs = list(zip(on_dev, host))
    assert len(pairs) == 4
    for (x, y), (x2, y2) in pairs:
        assert x.device.type == dev.type and x.dtype == torch.uint8
        assert torch.equal(x, x2.to(dev)) and torch.equal(y, y2.to(dev))
    a, _ = run("byol_uniform", tmp_path_factory, "data.on_device=true")
    b, _ = run("byol_uniform", tmp_path_factory, "data.on_device=false", "data.workers=0")
    assert a == pytest.approx(b, rel=1e-5), (a, b)


RESUME = ["optim.epochs=2", "data.synthetic.train_size=128", "optim.batch_size=32"]  # 4 steps an epoch, 8 in all


@pytest.mark.parametrize("script", ["byol_uniform", "msbreg"])
def test_run_is_deterministic(script, tmp_path):
    """Two uninterrupted runs of 8 steps on the device: the same weights, bit for bit (what an exact resume
    needs; if this fails, the device's kernels are not deterministic and the resume test below cannot pass)."""
    s = Script(script, [*TINY, *RESUME])
    s.run(tmp_path, name="a")
    s.run(tmp_path, name="b")
    a, b = s.checkpoint(tmp_path, "a"), s.checkpoint(tmp_path, "b")
    for k, v in a["online"].items():
        assert torch.equal(v, b["online"][k]), f"{k} differs between two identical runs on {DEVICE}"


@pytest.mark.parametrize("script,cuts", [("byol_uniform", (3, 4)), ("msbreg", (3,))])
def test_resume_on_device_is_exact(script, cuts, tmp_path):
    """Stopped mid-epoch (3) and at an epoch's last step (4), resumed with resume=auto: the uninterrupted run's
    weights, EMA target and metrics.jsonl, bit for bit (device RNG states, MSBReg's Brownian noise included)."""
    Script(script, [*TINY, *RESUME]).assert_resume_exact(tmp_path, parts=("online", "target"), cuts=cuts)
