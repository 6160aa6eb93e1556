"""python -m common.tools.export: the online encoder as a torchvision ResNet state_dict, loaded back with the lines the
command prints (and the README shows), giving the project encoder's features; bad input is one line, exit 2."""
import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

from common import checkpoint
from common.config import parse
from common.models import mlp, resnet
from common.tools import export

from scriptrun import ROOT, Script

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(script, *sets):
    mod = importlib.import_module(script)
    return mod, parse(["--set", *sets], mod.DEFAULTS, getattr(mod, "CHOICES", None), method=script)


def _online(script, cfg):
    """The online network each script builds (and saves as the checkpoint's ``online``)."""
    mod = importlib.import_module(script)
    if script == "center_penalty":
        return mod.build_model(cfg)
    if script == "decorr_nostopgrad":
        return mod.Decorr(cfg.model, cfg.loss.identity_predictor)
    if script == "msbreg":
        return mod.MultiViewOnline(cfg.model)
    return mod.Online(cfg.model, mod.predictor) if script == "raft" else mod.Online(cfg.model)


def _randomise(net):
    """Random weights and BatchNorm statistics, so eval-mode features depend on every exported tensor."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.2 + (0.9 if t.dim() == 1 else -0.1))
    return net.eval()


def _checkpoint(tmp_path, script, *sets):
    _, cfg = _cfg(script, *sets)
    online = _randomise(_online(script, cfg))
    path = tmp_path / "last.pt"
    checkpoint.save(checkpoint.snapshot(cfg, {"step": 1}, script, online=online), path)
    return online, cfg, path


def _load_printed_lines(lines):
    """Run the loading lines the command printed; returns ``net``."""
    code = "\n".join(x.strip() for x in lines[1:] if x.startswith("    "))
    scope = {"torch": torch, "torchvision": torchvision, "nn": nn}
    exec(code, scope)  # noqa: S102 - the lines a user copies
    return scope["net"].eval()


def test_resnet18_cifar_stem_loads_into_torchvision_with_the_three_readme_lines(tmp_path):
    online, _, ckpt = _checkpoint(tmp_path, "byol_uniform", "model.arch=resnet18", "model.cifar_stem=true",
                                  "model.proj_hidden=32", "model.pred_hidden=32", "model.proj_dim=16")
    out = tmp_path / "backbone.pt"
    lines = export.export(ckpt, out)
    # the README's lines, typed by hand
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool, net.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    net.load_state_dict(torch.load(out, weights_only=True))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net.eval()(x), online.f(x))
    torch.testing.assert_close(_load_printed_lines(lines)(x), online.f(x))
    assert "CIFAR stem" in lines[0] and "512-d features" in lines[0]


def test_resnet50_imagenet_stem_and_projector(tmp_path):
    online, cfg, ckpt = _checkpoint(tmp_path, "byol_uniform", "model.arch=resnet50", "model.cifar_stem=false",
                                    "model.proj_hidden=32", "model.pred_hidden=32", "model.proj_dim=16")
    out, proj = tmp_path / "backbone.pt", tmp_path / "projector.pt"
    lines = export.export(ckpt, out, projector=proj)
    net = torchvision.models.resnet50()
    net.fc = nn.Identity()
    net.load_state_dict(torch.load(out, weights_only=True))
    x = torch.randn(1, 3, 40, 40)
    torch.testing.assert_close(net.eval()(x), online.f(x))
    assert "net.fc = nn.Identity()" in lines[2] and "maxpool" not in "".join(lines)
    assert "mlp(2048, 32, 16, layers=2, norm='bn')" in lines[-1]
    g = mlp(2048, 32, 16, layers=2, norm="bn")
    g.load_state_dict(torch.load(proj, weights_only=True))
    f = torch.randn(3, 2048)
    torch.testing.assert_close(g.eval()(f), online.g(f))


def test_narrow_width_and_group_norm_load_as_printed(tmp_path):
    """width 8 is no stock torchvision ResNet: it loads into common.models.resnet (torchvision's names);
    norm gn is torchvision's ResNet with norm_layer=GroupNorm."""
    for sets, want in ((["model.width=8"], "from common.models import resnet"),
                       (["model.norm=gn"], "norm_layer=lambda c: nn.GroupNorm(min(32, c), c)")):
        online, _, ckpt = _checkpoint(tmp_path, "byol_uniform", "model.proj_hidden=32", "model.pred_hidden=32",
                                      "model.proj_dim=16", *sets)
        lines = export.export(ckpt, tmp_path / "backbone.pt")
        assert want in "\n".join(lines)
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(_load_printed_lines(lines)(x), online.f(x))
    sd = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert set(sd) == set(torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(8, c)).state_dict()) - {
        "fc.weight", "fc.bias"}


@pytest.mark.parametrize("script", ["byol_uniform", "byol_mhe", "msbreg", "raft", "decorr_nostopgrad",
                                    "center_penalty"])
def test_every_scripts_online_network_exports(tmp_path, script):
    """Each script's checkpoint keeps the encoder under online.f.* in torchvision's names."""
    heads = ["model.proj_hidden=16", "model.proj_dim=8"] + ([] if script == "decorr_nostopgrad" else
                                                            ["model.pred_hidden=16"])  # Decorr: a linear W_p
    online, cfg, ckpt = _checkpoint(tmp_path, script, "model.width=8", *heads)
    lines = export.export(ckpt, tmp_path / "b.pt", projector=tmp_path / "g.pt")
    net = resnet(cfg.model.arch, 8, cfg.model.cifar_stem, cfg.model.norm)[0]
    net.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net.eval()(x), online.f(x))
    g = torch.load(tmp_path / "g.pt", weights_only=True)
    want = online.g.state_dict()
    assert g.keys() == want.keys() and all(torch.equal(g[k], v) for k, v in want.items())
    # Decorr's projector has no Linear biases (model.proj_bias: false): no plain mlp(...) call builds it
    how = "build g as the run's script does" if script == "decorr_nostopgrad" else "from common.models import mlp"
    assert how in lines[-1], lines[-1]


def test_a_real_run_exports_from_its_run_folder(tmp_path):
    tiny = ["data.synthetic.train_size=64", "data.synthetic.test_size=32", "model.width=8", "model.proj_hidden=16",
            "model.proj_dim=8", "model.pred_hidden=16", "optim.batch_size=32", "optim.epochs=1",
            "optim.warmup_epochs=0", "eval.linear=none", "eval.knn_k=[5]"]
    Script("byol_uniform", tiny).run(tmp_path)
    run = tmp_path / "byol_uniform" / "r"
    p = subprocess.run([sys.executable, "-m", "common.tools.export", str(run), "--out", str(tmp_path / "b.pt")],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].startswith("wrote the online encoder (resnet18, width 8, CIFAR stem")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    net = resnet("resnet18", 8, True)[0]
    net.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    f = resnet("resnet18", 8, True)[0]
    f.load_state_dict({k[2:]: v for k, v in state["online"].items() if k.startswith("f.")})
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net.eval()(x), f.eval()(x))


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "corrupt.pt").write_bytes(b"not a zip file" * 10)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    for arg, want in ((tmp_path / "missing.pt", "no checkpoint at"), (tmp_path, "no checkpoint at"),
                      (tmp_path / "corrupt.pt", "is corrupt or unreadable"),
                      (tmp_path / "foreign.pt", "holds no online network")):
        with pytest.raises(SystemExit) as e:
            export.main([str(arg), "--out", str(tmp_path / "b.pt")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and want in err[0], err
    assert not (tmp_path / "b.pt").exists()


def test_export_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    """--out / --projector that is the input itself or another training checkpoint: one line, nothing replaced."""
    _, _, path = _checkpoint(tmp_path, "byol_uniform", "model.width=8")
    other = tmp_path / "run2" / "checkpoints" / "last.pt"
    other.parent.mkdir(parents=True)
    other.write_bytes(path.read_bytes())
    before = path.read_bytes()
    for args, want in (([str(path), "--out", str(path)], "--out"),
                       ([str(path), "--out", str(other)], "--out"),
                       ([str(path), "--out", str(tmp_path / "b.pt"), "--projector", str(path)], "--projector"),
                       ([str(path), "--out", str(tmp_path / "b.pt"), "--projector", str(other)], "--projector")):
        with pytest.raises(SystemExit) as e:
            export.main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
        assert f"choose another {want}" in err[0], err
        assert path.read_bytes() == before and other.read_bytes() == before
    assert not (tmp_path / "b.pt").exists()
    export.main([str(path), "--out", str(tmp_path / "b.pt")])  # an earlier export is replaced as asked
    export.main([str(path), "--out", str(tmp_path / "b.pt")])
    assert (tmp_path / "b.pt").exists()


def test_export_to_an_unwritable_place_names_out_not_out_dir(tmp_path, capsys, monkeypatch):
    _, _, path = _checkpoint(tmp_path, "byol_uniform", "model.width=8")

    def denied(obj, f, *a, **k):
        raise PermissionError(13, "Permission denied")
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: denied(obj, f) if "b.pt" in str(f.name) else
                        real(obj, f, *a, **k))
    with pytest.raises(SystemExit):
        export.main([str(path), "--out", str(tmp_path / "b.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose another --out" in err[0] and "out_dir" not in err[0], err


def test_export_refuses_out_and_projector_at_one_path(tmp_path, capsys):
    """--out and --projector naming one file (by resolved path: another spelling, a symlink): one line, nothing
    written (the projector would replace the encoder)."""
    _, _, path = _checkpoint(tmp_path, "byol_uniform", "model.width=8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.pt").symlink_to(tmp_path / "b.pt")
    for proj in (tmp_path / "b.pt", tmp_path / "sub" / ".." / "b.pt", tmp_path / "link.pt"):
        with pytest.raises(SystemExit) as e:
            export.main([str(path), "--out", str(tmp_path / "b.pt"), "--projector", str(proj)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "same file" in err[0], err
        assert "choose another --projector" in err[0] and not (tmp_path / "b.pt").exists()
    export.main([str(path), "--out", str(tmp_path / "b.pt"), "--projector", str(tmp_path / "g.pt")])
    assert checkpoint.DIGEST not in torch.load(tmp_path / "b.pt", weights_only=True)  # plain weights for users
