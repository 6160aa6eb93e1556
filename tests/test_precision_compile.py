"""Precision and compile options end to end, in process on tiny settings: ``precision: bf16`` (autocast) and
``precision: fp16`` (autocast + GradScaler) keep every script's loss close to fp32 and its weights and EMA target
in fp32; ``compile: true`` runs (SyncBN left eager)."""
import json

import pytest
import torch
import torch.nn as nn

from common import dist
from common.config import Cfg
from common.models import maybe_compile, resnet
from common.tools import benchmark

TINY = ["device=cpu", "data.synthetic.train_size=64", "data.synthetic.test_size=32", "data.synthetic.size=16",
        "data.image_size=16", "data.on_device=true", "model.arch=resnet18", "model.cifar_stem=true", "model.width=4",
        "model.proj_hidden=64", "model.proj_dim=32", "model.pred_hidden=64", "optim.batch_size=32", "optim.epochs=1",
        "log.every=1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _bf16_autocast_on_cpu():
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    except RuntimeError:
        return False


def _fp16_autocast_on_cpu():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float16 and bool(torch.amp.GradScaler("cpu"))
    except (RuntimeError, AttributeError):
        return False


def _first_loss(script, tmp_path, *overrides):
    name = "_".join(o.replace("=", "-") for o in overrides) or "fp32"
    tiny = [o for o in TINY if not (script == "decorr_nostopgrad" and o.startswith("model.pred_hidden"))]
    benchmark.run_script(script, [*tiny, "checkpoint.stop_after_step=1", f"out_dir={tmp_path}", f"name={name}",
                                  *overrides])
    run = tmp_path / script / name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(m["loss"] for m in lines if "loss" in m), torch.load(run / "checkpoints" / "last.pt", weights_only=True)


@pytest.mark.skipif(not _bf16_autocast_on_cpu(), reason="no bf16 autocast on this CPU")
@pytest.mark.parametrize("script", benchmark.SCRIPTS)
def test_bf16_autocast_loss_close_to_fp32(script, tmp_path):
    """The first step's loss (same init, same views) under bf16 autocast is within 1e-2 relative of fp32,
    and the weights (online, EMA target) stay fp32."""
    fp32, _ = _first_loss(script, tmp_path)
    bf16, ckpt = _first_loss(script, tmp_path, "precision=bf16")
    assert bf16 == pytest.approx(fp32, rel=1e-2), (fp32, bf16)
    for part in ("online", "target"):
        for k, v in ckpt.get(part, {}).items():
            assert v.dtype in (torch.float32, torch.int64), (part, k, v.dtype)


@pytest.mark.skipif(not _fp16_autocast_on_cpu(), reason="no fp16 autocast / GradScaler on this CPU")
@pytest.mark.parametrize("script", benchmark.SCRIPTS)
def test_fp16_autocast_with_grad_scaler(script, tmp_path):
    """fp16 (V100/T4: no bf16): the first loss within 1e-2 of fp32, fp32 weights, and the GradScaler's state in the
    checkpoint (its scale starts at 2^16 and halves when a step's gradients overflow: that step is skipped), so
    that a resumed run continues with the same scale."""
    fp32, _ = _first_loss(script, tmp_path)
    fp16, ckpt = _first_loss(script, tmp_path, "precision=fp16")
    assert fp16 == pytest.approx(fp32, rel=1e-2), (fp32, fp16)
    assert ckpt["scaler"]["scale"] in (2.0 ** 16, 2.0 ** 15) and ckpt["scaler"]["growth_interval"] == 2000
    for k, v in ckpt["online"].items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 3))


def test_compile_false_is_a_no_op():
    net = _net()
    assert maybe_compile(net, Cfg(compile=False)) is net and net._compiled_call_impl is None


@pytest.mark.parametrize("sync", [False, True])
def test_compile_keeps_sync_bn_outside_the_graphs(sync, monkeypatch):
    """A recording backend: a plain-BN ResNet compiles to one graph, batch norm inside; with synchronised
    BN (Gloo's here, torch's SyncBatchNorm on CUDA) the BN layers run eagerly between compiled pieces."""
    graphs = []

    def record(gm, inputs):
        graphs.append(gm)
        return gm.forward

    compile_ = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_(self, backend=record))
    torch.manual_seed(0)
    net = resnet("resnet18", 4, True, "bn")[0]
    net = dist.convert_sync_bn(net, on_cuda=False) if sync else net
    keys = list(net.state_dict())
    torch._dynamo.reset()
    maybe_compile(net, Cfg(compile=True))
    net(torch.randn(4, 3, 16, 16))
    code = "\n".join(gm.code for gm in graphs)
    assert "conv2d" in code and list(net.state_dict()) == keys
    assert (len(graphs) > 1 and "batch_norm" not in code) if sync else (len(graphs) == 1 and "batch_norm" in code)


@pytest.mark.skipif(not any(__import__("shutil").which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's inductor needs a C++ compiler on CPU and none is installed")
def test_compile_with_inductor_matches_eager():
    """compile: true with the default backend (inductor, C++ on CPU): same outputs and gradients."""
    eager, compiled = _net(), _net()
    x = torch.randn(4, 3, 16, 16)
    torch._dynamo.reset()
    maybe_compile(compiled, Cfg(compile=True))
    for net in (eager, compiled):
        net(x).square().sum().backward()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)


def test_compile_true_runs_a_script(tmp_path, monkeypatch):
    """byol_uniform with compile: true (the encoder traced by dynamo and AOT autograd; the aot_eager
    backend stands in for inductor, whose C++ build of a ResNet takes minutes on 2 CPU cores): the first
    loss equals the eager run's, and kNN evaluation (eval mode, other batch shapes) works on it."""
    compile_ = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager"))
    torch._dynamo.reset()
    eager, _ = _first_loss("byol_uniform", tmp_path)
    compiled, _ = _first_loss("byol_uniform", tmp_path, "compile=true")
    assert compiled == pytest.approx(eager, rel=1e-4)
