"""byol_mhe.py end to end as a user runs it (subprocesses): smoke run with per-layer energies, gradient
accumulation, DDP equivalence, exact resume, one clear error for bad MHE settings, every paper row's
command resolves, and (slow) the quickstart's learning check."""
import json
import re
import shlex

import pytest

from common.config import parse

import byol_mhe as bm
from scriptrun import FIXED_VIEWS, ROOT, Script, config_error, one_clear_line

QUICK = ROOT / "configs" / "quickstart" / "byol_mhe.yaml"
TINY = ["data.synthetic.train_size=128", "data.synthetic.test_size=64", "model.width=8", "model.proj_hidden=32",
        "model.proj_dim=16", "model.pred_hidden=32", "optim.batch_size=32", "optim.epochs=1",
        "optim.warmup_epochs=0", "eval.linear_epochs=2", "log.every=1", "eval.knn_k=[20]"]
S = Script("byol_mhe", TINY)
run, metrics, params = S.run, S.metrics, S.checkpoint


def test_smoke_run_writes_every_output_and_logs_each_layers_energy(tmp_path):
    run(tmp_path, "mhe.layers=[encoder,projector,predictor]", "mhe.power=1")
    d = tmp_path / "byol_mhe" / "r"
    for f in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "summary.json"):
        assert (d / f).is_file(), f
    s = json.loads((d / "summary.json").read_text())
    for k in ("knn20", "knn_init", "linear_top1", "alignment", "uniformity", "wall_time_s", "images_per_s",
              "energy/encoder.conv1", "energy/projector.0", "energy/predictor.3", "energy_mean/encoder"):
        assert k in s, k
    assert s["mhe_power"] == "1" and "power: '1'" in (d / "config.yaml").read_text()
    m = metrics(tmp_path, "r")
    steps = [x for x in m if "loss" in x]
    assert len(steps) == 4  # 128 / 32
    for x in steps:  # Eq. 10: L = L_BYOL + λ Σ E/(N(N-1)); 24 layers of E_1 ~ 1/√2 each at init
        assert x["loss"] == pytest.approx(x["loss_byol"] + 10 * x["loss_mhe"], rel=1e-4)
        assert 24 * 0.6 < x["loss_mhe"] < 24 * 0.8
    evals = [x for x in m if "knn20" in x or "knn20_init" in x]
    assert len(evals) == 2 and all(len([k for k in x if k.startswith("energy/")]) == 24 for x in evals)


def test_plain_byol_rows_log_no_mhe_and_accumulation_counts_steps(tmp_path):
    run(tmp_path, "mhe.layers=[]", "optim.accum_steps=2", name="byol")
    m = metrics(tmp_path, "byol")
    steps = [x for x in m if "loss" in x]
    assert len(steps) == 2 and all(x["loss_mhe"] == 0 and x["loss"] == x["loss_byol"] for x in steps)
    assert not any(k.startswith("energy/") for x in m for k in x)  # no regularised layer
    assert all("energy_mean/projector" in x for x in m if "knn20" in x)  # but the baseline's energy is logged
    assert params(tmp_path, "byol")["counters"]["step"] == 2


@pytest.mark.slow  # the DDP machinery is common (2 vs 1 in default runs: byol_uniform, msbreg, decorr)
def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    """Same global batch (fixed views), the first step with 1 and with 2 processes: the MHE term (the same on
    every rank) plus DDP's gradient average gives the one-process update."""
    common = [*FIXED_VIEWS, "optim.lr=0.1", "mhe.layers=[encoder,projector]"]
    S.assert_two_processes_equal_one(tmp_path, *common, keys=("loss", "loss_mhe"))


def test_exact_resume_equals_uninterrupted_run(tmp_path):
    more = ["optim.epochs=2", "eval.linear=none"]
    S.assert_resume_exact(tmp_path, *more, parts=("online", "target"), cuts=(3,))  # mid-epoch 0 (4 steps/epoch)


def test_bad_mhe_settings_stop_with_one_clear_line(tmp_path):
    line = one_clear_line(run(tmp_path, "mhe.power=3", check=False))  # checked in train() (check_mhe)
    assert "mhe.power" in line and "a0, a1, a2" in line
    line = one_clear_line(run(tmp_path, "mhe.layers=[projector,decoder]", check=False))
    assert "mhe.layers" in line and "encoder, projector, predictor" in line
    line = config_error("byol_mhe", "mhe.wieght=1")
    assert "mhe.wieght" in line and "Did you mean 'mhe.weight'" in line


# ---------------------------------------------------------------------------------------- paper configs
CONFIGS = sorted(p for p in (ROOT / "configs" / "byol_mhe").glob("*.yaml")
                 if not p.name.startswith("fashion_mnist"))  # (the CPU table's setting, not a paper's)


def paper_rows():
    """Every `python byol_mhe.py --config ...` command written in the comments of configs/byol_mhe/*.yaml."""
    rows = []
    for f in CONFIGS:
        for line in f.read_text().splitlines():
            m = re.match(r"#.*?(python byol_mhe\.py .*)$", line)
            if m:
                rows.append((f.name, shlex.split(m.group(1).split("  #")[0])[2:]))
    return rows


def test_every_table_row_has_a_command_that_resolves():
    rows = paper_rows()
    got = {}
    for fname, argv in rows:
        cfg = bm.check_mhe(parse(argv, bm.DEFAULTS, method=bm.METHOD))
        key = (cfg.data.name, cfg.model.arch, cfg.optim.epochs)
        got.setdefault(key, []).append(cfg)
    assert {("imagenet", "resnet50", 300), ("cifar10", "resnet50", 1000), ("cifar100", "resnet50", 1000),
            ("cifar10", "resnet18", 300)} <= set(got)
    r18 = got[("cifar10", "resnet18", 300)]
    on = [c for c in r18 if c.mhe.weight > 0 and c.mhe.layers]
    # Tab. 4: all 8 subsets of {encoder, projector, predictor} (the empty one = BYOL repro, a2, weight 10)
    assert {tuple(sorted(c.mhe.layers)) for c in r18 if c.mhe.power == "a2" and c.model.norm == "bn"
            and c.optim.batch_size * c.optim.accum_steps == 1024 and c.mhe.weight in (0, 10)} >= \
        {tuple(sorted(s)) for s in [(), ("encoder",), ("projector",), ("predictor",), ("encoder", "projector"),
                                    ("encoder", "predictor"), ("projector", "predictor"),
                                    ("encoder", "projector", "predictor")]}
    assert {c.mhe.weight for c in on if c.mhe.power == "2"} >= {0.001, 0.01, 1, 10, 100}  # Tab. 5 (s = 2)
    assert {c.mhe.power for c in on if c.mhe.weight == 10} == set(bm.POWERS)  # Tab. 6
    assert {(c.model.norm, bool(c.mhe.layers)) for c in r18} >= {("none", False), ("none", True), ("bn", False),
                                                                 ("bn", True)}  # Tab. 3
    tab7 = {(c.optim.batch_size, c.optim.accum_steps, bool(c.mhe.layers)) for c in r18}
    assert {(1024 // n, n, mhe) for n in (1, 2, 4, 8) for mhe in (False, True)} <= tab7  # Tab. 7
    assert all(c.optim.lr == 1.5 and c.ema.tau == 0.99 for c in r18)  # §3.5, CIFAR 300 ep
    for c in got[("cifar10", "resnet50", 1000)] + got[("cifar100", "resnet50", 1000)]:
        assert c.optim.lr == 1.0 and c.ema.tau == 0.996 and c.optim.batch_size * c.optim.accum_steps == 1024
    for c in got[("imagenet", "resnet50", 300)]:
        assert c.optim.lr == 0.3 and c.ema.tau == 0.99 and c.optim.batch_size == 512 and c.optim.weight_decay == 1e-6
    assert any(c.mhe.weight == 0.1 for c in got[("imagenet", "resnet50", 300)])  # §4's λ_mhe = 0.1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_each_paper_config_names_its_table_and_defaults_to_app_d(config):
    text = config.read_text()
    assert re.search(r"Tab\. \d|§\d|App\. D", text.split("\n\n")[0]), "the header names its table/section"
    cfg = bm.check_mhe(parse(["--config", str(config)], bm.DEFAULTS, method=bm.METHOD))
    assert cfg.optim.name == "lars" and cfg.optim.warmup_epochs == 10 and cfg.optim.exclude_bias_norm
    assert cfg.eval.linear_epochs == 80 and cfg.eval.linear_batch_size == 100 and cfg.eval.linear_lr == 0.2
    assert cfg.mhe.power == "a2" and sorted(cfg.mhe.layers) == ["predictor", "projector"]


@pytest.mark.parametrize("script", ["byol_mhe", "byol_uniform"])
def test_defaults_alone_are_the_papers_cifar10_resnet18_setting_with_app_d_probe(script):
    """A run from DEFAULTS alone: §3.5's CIFAR-10 300-epoch setting (batch 1024, LR_base 1.5) and App. D's linear
    protocol (ft_epochs 80, ft_batch_size 100, ft_learning_rate 0.2, ft_weight_decay 0, SGD), augmented (§4)."""
    import importlib
    mod = importlib.import_module(script)
    cfg = parse([], mod.DEFAULTS, getattr(mod, "CHOICES", None), method=mod.METHOD)
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.optim.epochs, cfg.model.pred_hidden) == (1024, 1.5, 300, 4096)
    e = cfg.eval
    assert (e.linear, e.linear_epochs, e.linear_batch_size, e.linear_lr, e.linear_weight_decay, e.linear_optimizer) \
        == ("paper", 80, 100, 0.2, 0.0, "sgd")
