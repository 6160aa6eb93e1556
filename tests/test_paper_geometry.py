"""Every paper config starts at its own geometry (issue #25): each config under ``configs/<method>/`` (not the
quickstarts, not ``fashion_mnist*``, not the ``_*.yaml`` bases they inherit) maps to a representative of its
geometry, and (slow) every representative trains 2 optimizer steps, evaluates, checkpoints and resumes under 2 Gloo
processes with its own architecture, width, heads, image size, views and augmentation path. Only the data (a few
dozen images of the config's size) and the run length are replaced; the test checks that nothing else is.

The data: CIFAR and STL-10 configs get the synthetic generator at the dataset's source size (32 px, 96 px), ImageNet
configs a fake ``<root>/imagenet/{train,val}/<wnid>/`` of ~500x375 JPEGs (decode -> random resized crop -> the
config's path, and the 1000-class probe), ImageNet-100 configs the same JPEGs as ``data.name=folder`` at 224 px (its
own loader needs all 100 class folders, i.e. an epoch of 25+ steps). ``toy2d`` configs (no images) run on one
process, as ``center_penalty.py`` requires, with one seed and two epochs.
"""
import importlib
import json
import math
import os
import time
from collections import defaultdict

import pytest
import torch

from common import config

from scriptrun import ROOT, Script

METHODS = ("byol_uniform", "byol_mhe", "msbreg", "raft", "decorr_nostopgrad", "center_penalty")
CONFIGS = sorted(p for m in METHODS for p in (ROOT / "configs" / m).glob("*.yaml")
                 if not p.stem.startswith(("fashion_mnist", "_")))
# One config per geometry; test_every_config_maps_to_a_representative keeps this list exact in both directions.
REPRESENTATIVES = [
    "byol_mhe/cifar10_resnet18_300ep.yaml", "byol_mhe/cifar_resnet50_1000ep.yaml",
    "byol_mhe/imagenet_resnet50_300ep.yaml",
    "byol_uniform/tab7_uni_bs128.yaml", "byol_uniform/cifar10_resnet50_1000ep.yaml",
    "byol_uniform/imagenet_resnet50_300ep.yaml",
    "center_penalty/cifar10_resnet18_center_penalty.yaml", "center_penalty/imagenet100_center_penalty.yaml",
    "center_penalty/imagenet100_simsiam.yaml",
    "center_penalty/toy_app_b1_minibatch_shifted.yaml", "center_penalty/toy_blobs.yaml",
    "center_penalty/toy_moons.yaml",
    "decorr_nostopgrad/cifar10_resnet18_1gpu.yaml",
    "decorr_nostopgrad/authors_code_imagenet_resnet50.yaml", "decorr_nostopgrad/tab3_row2_inv1_cov1.yaml",
    "decorr_nostopgrad/tab1_k32_inv25_cov1.yaml", "decorr_nostopgrad/tab1_k8_inv25_cov1.yaml",
    "decorr_nostopgrad/tab2_p4096-256_k1_inv1_cov1.yaml", "decorr_nostopgrad/tab2_p4096-256_k32_inv10_cov1.yaml",
    "decorr_nostopgrad/tab2_p8192x3_k8_inv25_cov8.yaml", "decorr_nostopgrad/tab3_row6_ipred_inv1_cov1.yaml",
    "msbreg/imagenet100_resnet18_320ep_k4.yaml", "msbreg/imagenet100_resnet18_320ep_k8.yaml",
    "msbreg/imagenet_resnet50_300ep_k4.yaml", "msbreg/stl10_resnet18_1gpu_bs256_k4.yaml",
    "msbreg/stl10_resnet18_320ep_k8.yaml",
    "raft/raft-lp.yaml", "raft/byol-lpi.yaml", "raft/raft-mlpp.yaml", "raft/raft-np.yaml",
]
# Representatives left out of the default slow run (this file's share of CI: about 12 minutes on 2 cores); each
# is another 224 px geometry of a script whose 224 px path a default representative runs. ONEFILE_ALL_GEOMETRIES=1
# runs them too (minutes each on a shared 2-core machine).
LONG = {
    "center_penalty/imagenet100_center_penalty.yaml": "ResNet-50 at 224 px; imagenet100_simsiam.yaml runs it",
    "byol_mhe/cifar_resnet50_1000ep.yaml": "ResNet-50 with the CIFAR stem; byol_uniform/cifar10_resnet50_1000ep.yaml "
    "runs it (CI time)",
    "msbreg/imagenet100_resnet18_320ep_k8.yaml": "8 views at 224 px; stl10_resnet18_320ep_k8.yaml runs K=8",
    "msbreg/imagenet_resnet50_300ep_k4.yaml": "ResNet-50 at 224 px, 4 views",
    "decorr_nostopgrad/authors_code_imagenet_resnet50.yaml": "8192-d projector and W_p: ~8 GB per process, and "
    "Fig. 4's eigenvalues of the 8192x8192 W_p (float64, on the CPU) take minutes at every evaluation",
    "decorr_nostopgrad/tab2_p8192x3_k8_inv25_cov8.yaml": "as authors_code_imagenet_resnet50.yaml (8192-d)",
    "decorr_nostopgrad/tab1_k32_inv25_cov1.yaml": "32 partitions: 32 images per step at 224 px",
    "decorr_nostopgrad/tab2_p4096-256_k32_inv10_cov1.yaml": "32 partitions: 32 images per step at 224 px",
    "decorr_nostopgrad/tab1_k8_inv25_cov1.yaml": "ResNet-50 at 224 px; tab3_row2_inv1_cov1.yaml runs it",
    "decorr_nostopgrad/tab2_p4096-256_k1_inv1_cov1.yaml": "ResNet-50 at 224 px; tab3_row2_inv1_cov1.yaml runs it",
    "decorr_nostopgrad/tab3_row6_ipred_inv1_cov1.yaml": "ResNet-50 at 224 px; tab3_row2_inv1_cov1.yaml runs it",
}
WORLD, PER_PROCESS = 2, 2  # Gloo processes; images per process and step (SyncBatchNorm sees 4)
SOURCE = {"cifar10": 32, "cifar100": 32, "stl10": 96}  # the synthetic stand-in's size: the dataset's own images
# what a run may change: the data and the run length (and the bookkeeping of the test's run folders)
RUN_LENGTH = ("data.name", "data.root", "data.synthetic.", "data.workers", "optim.batch_size", "optim.epochs",
              "eval.knn_k", "eval.knn_majority_k", "eval.batch_size", "eval.linear_epochs", "eval.linear_batch_size",
              "checkpoint.stop_after_step", "log.every", "seeds", "toy.seeds", "dist.nproc", "name", "out_dir",
              "resume")


def _rel(path):
    return str(path.relative_to(ROOT / "configs"))


def resolved(path, overrides=()):
    """The config as ``python <method>.py --config path --set overrides`` parses it (its DEFAULTS, presets)."""
    method = path.parent.name
    mod = importlib.import_module(method)
    argv = ["--config", str(path), *(["--set", *overrides] if overrides else [])]
    return config._parse(argv, mod.DEFAULTS, getattr(mod, "CHOICES", None), method)


def geometry(method, cfg):
    """What fixes the tensor shapes and the code path of the data: the script, the encoder and heads (every
    ``model`` key but SyncBN, the zero-init of residual branches and RAFT's teacher init), dataset and image size,
    augmentation path, number of views (MSBReg's K), Decorr's partitions and identity predictor (no W_p), and
    whether SimSiam's predictor exists (center_penalty). Loss weights, optimizer, precision and schedules are not
    geometry; nor is the dataset beyond its stand-in (``tiny``): CIFAR-10 and CIFAR-100 both become 32 px synthetic
    images, ImageNet and ImageNet-100 both 500x375 JPEGs cropped to ``data.image_size``."""
    d, m, L = cfg.data, cfg.model, cfg.get("loss", {})
    predictor = L.get("variant") in ("simsiam", "simsiam_no_stopgrad") if method == "center_penalty" else None
    if d.name == "toy2d":
        t = cfg.toy
        return (method, "toy2d", t.dataset, t.hidden, t.out_dim, t.layers, t.norm,
                t.b1_augs if t.dataset == "app_b1" else 2, predictor and t.pred_hidden)
    model = json.dumps({k: v for k, v in m.items() if k not in ("sync_bn", "zero_init_residual", "same_init")},
                       sort_keys=True)
    data = (f"{SOURCE[d.name]} px in memory" if d.name in SOURCE else "JPEG files", d.image_size)  # the stand-in
    return (method, *data, model, cfg.augment.path, L.get("K", 2), L.get("partitions"), L.get("identity_predictor"),
            predictor)


def test_every_config_maps_to_a_representative():
    """Both directions: every config's geometry has a representative (else add one), and every representative
    is a config of its own geometry, the only one (else the list is stale)."""
    assert len(CONFIGS) > 80
    reps = defaultdict(list)
    for r in REPRESENTATIVES:
        path = ROOT / "configs" / r
        assert path in CONFIGS, f"representative {r} is not a config of configs/<method>/"
        reps[geometry(path.parent.name, resolved(path))].append(r)
    same = [v for v in reps.values() if len(v) > 1]
    assert not same, f"representatives of one geometry (keep one of each): {same}"
    missing = [_rel(p) for p in CONFIGS if geometry(p.parent.name, resolved(p)) not in reps]
    assert not missing, f"configs whose geometry no representative runs (add one to REPRESENTATIVES): {missing}"
    assert set(LONG) <= set(REPRESENTATIVES), set(LONG) - set(REPRESENTATIVES)


def test_geometry_sees_shapes():
    """The key separates what changes shapes and merges what does not."""
    cfg = lambda name, *o: geometry(name.split("/")[0], resolved(ROOT / "configs" / name, o))  # noqa: E731
    base = cfg("decorr_nostopgrad/tab1_k8_inv25_cov1.yaml")
    assert cfg("decorr_nostopgrad/tab1_k8_inv25_cov25.yaml") == base  # a loss weight
    for o in ("loss.partitions=32", "model.proj_dim=256", "model.width=32", "data.image_size=96",
              "augment.path=hybrid", "model.cifar_stem=true", "loss.identity_predictor=true"):
        assert cfg("decorr_nostopgrad/tab1_k8_inv25_cov1.yaml", o) != base, o
    assert cfg("msbreg/stl10_resnet18_320ep_k4.yaml", "loss.K=8") == cfg("msbreg/stl10_resnet18_320ep_k8.yaml")
    assert cfg("raft/raft-lp.yaml") == cfg("raft/byol-lp.yaml") != cfg("raft/byol-lpi.yaml")


# ------------------------------------------------------------------------------------------------- slow runs
def _jpegs(folder, n, classes, seed):
    """``n`` random-ish 500x375 JPEGs (quality 75, like ImageNet's) in ``classes`` class folders."""
    from torchvision.transforms.v2.functional import to_pil_image
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = torch.nn.functional.interpolate(torch.rand(1, 3, 24, 32, generator=g), size=(375, 500), mode="bicubic")
        x = (x[0] + 0.1 * torch.randn(3, 375, 500, generator=g)).clamp(0, 1).mul(255).to(torch.uint8)
        (folder / classes[i % len(classes)]).mkdir(parents=True, exist_ok=True)
        to_pil_image(x).save(folder / classes[i % len(classes)] / f"{i:03d}.JPEG", quality=75)


def tiny(cfg, tmp_path):
    """The overrides of a representative's run: a few dozen images of its size and 2 steps of a tiny batch."""
    if cfg.data.name == "toy2d":
        return ["toy.seeds=[0]", "optim.epochs=2"]
    k = cfg.get("loss", {}).get("partitions") or 1
    batch = math.lcm(WORLD * PER_PROCESS, k)  # Decorr: equal partitions (Eq. 19), k/W per process when W | k
    n = 2 * batch * cfg.optim.accum_steps  # one epoch = 2 optimizer steps
    bank, probe_batch = n, min(4, n)
    o = [f"optim.batch_size={batch}", "optim.epochs=1", "data.workers=1", "log.every=1", "eval.batch_size=8",
         "eval.linear_epochs=1", f"eval.linear_batch_size={probe_batch}"]
    name = cfg.data.name
    if name in SOURCE:
        o += ["data.name=synthetic", f"data.synthetic.size={SOURCE[name]}", f"data.synthetic.train_size={n}",
              "data.synthetic.test_size=8"]
    else:  # JPEGs: imagenet keeps its own loader (and 1000 classes); imagenet100 as a folder at 224 px
        root = tmp_path / "data"
        sub = root / "imagenet" if name == "imagenet" else root
        wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
        _jpegs(sub / "train", n, wnids, 0)
        _jpegs(sub / "val", 4, wnids, 1)
        o += [f"data.root={root}"] + ([] if name == "imagenet" else ["data.name=folder"])
    ks = list(dict.fromkeys(min(x, bank) for x in cfg.eval.knn_k))
    o.append(f"eval.knn_k={json.dumps(ks)}")
    if cfg.eval.get("knn_majority_k"):
        o.append(f"eval.knn_majority_k={json.dumps([min(x, bank) for x in cfg.eval.knn_majority_k])}")
    if cfg.get("seeds"):
        o.append("seeds=[0]")
    return o


def _flat(c, prefix=""):
    for k, v in c.items():
        yield from (_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)])


def pinned(path, overrides):
    """``overrides`` plus the config's own values of every other key the new data's preset would change
    (``synthetic`` turns blur off and sets 32 px; ``folder`` sets 32 px); checks nothing else changed."""
    orig = dict(_flat(resolved(path)))
    new = dict(_flat(resolved(path, overrides)))
    keep = [f"{k}={json.dumps(v)}" for k, v in orig.items() if new[k] != v and not k.startswith(RUN_LENGTH)]
    new = dict(_flat(resolved(path, overrides + keep)))
    changed = [k for k in orig if new[k] != orig[k] and not k.startswith(RUN_LENGTH)]
    assert not changed, f"the run would change more than the data and its length: {changed}"
    return overrides + keep


@pytest.mark.slow
@pytest.mark.parametrize("rep", [pytest.param(r, marks=pytest.mark.skipif(
    r in LONG and os.environ.get("ONEFILE_ALL_GEOMETRIES") != "1", reason=f"ONEFILE_ALL_GEOMETRIES=1: {LONG.get(r)}"))
    for r in REPRESENTATIVES])
def test_representative_trains_evaluates_and_resumes(tmp_path, rep):
    """2 steps, the kNN monitor, ``last.pt``; then ``resume=auto``: the epoch's evaluation, the config's linear
    probe (1 epoch), ``summary.json``. Finite losses; the checkpoint holds the 2 steps."""
    path = ROOT / "configs" / rep
    method, cfg = path.parent.name, resolved(path)
    S, t0 = Script(method, [], config=path, timeout=900), time.time()
    o = pinned(path, tiny(cfg, tmp_path))
    if cfg.data.name == "toy2d":  # one process by design (center_penalty.py), no checkpoints: seconds per seed
        S.run(tmp_path, *o)
        s = S.summary(tmp_path, "r")
        assert math.isfinite(s[f"knn{cfg.eval.knn_k[0]}"]) and s["seeds"] == [0]
        print(f"{rep}: {time.time() - t0:.1f} s")
        return
    run_dir = S.folder(tmp_path, "r") / ("seed0" if cfg.get("seeds") else "")
    S.run(tmp_path, *o, "dist.nproc=2", "checkpoint.stop_after_step=2")  # exits 0 after writing last.pt
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["counters"]["step"] == 2
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert any(k.startswith("knn") and k.endswith("_init") for m in lines for k in m), "no kNN at init"
    p = S.run(tmp_path, *o, "dist.nproc=2", "resume=auto")
    assert "resuming" in p.stdout, p.stdout[-2000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]  # the run went on, no new start
    assert sum(any(k.startswith("knn") and k.endswith("_init") for k in m) for m in lines) == 1
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["steps"] == 2 and 0 <= s[f"knn{s['knn_k']}"] <= 100, s
    if cfg.eval.linear != "none":
        assert 0 <= s["linear_top1"] <= 100, s
    print(f"{rep}: {time.time() - t0:.1f} s")
