"""raft.py end to end as a user runs it (subprocesses): smoke runs for RAFT and BYOL, the per-epoch Tab. 1
metrics, exact resume, DDP equivalence, the seed list, one clear error for bad input and every paper config (the
quickstart's learning check: tests/test_readme_quickstart.py)."""

import re

import pytest
import torch

from common.config import UserError, _parse, parse

import raft
from scriptrun import FIXED_VIEWS, ROOT, Script, one_clear_line

QUICK = ROOT / "configs" / "quickstart" / "raft.yaml"
TINY = ["data.synthetic.train_size=128", "data.synthetic.test_size=64", "model.width=8", "model.proj_hidden=32",
        "model.proj_dim=16", "model.pred_hidden=32", "optim.batch_size=32", "optim.epochs=1",
        "eval.linear_epochs=2", "log.every=1", "eval.knn_k=[20]"]
S = Script("raft", TINY, timeout=900)
run, metrics, summary, params = S.run, S.metrics, S.summary, S.checkpoint


@pytest.mark.parametrize("objective,predictor", [("raft", "mlp"), ("byol", "linear")])
def test_smoke_run_writes_every_output(tmp_path, objective, predictor):
    run(tmp_path, f"loss.objective={objective}", f"model.predictor={predictor}", "optim.epochs=2")
    d = tmp_path / "raft" / "r"
    for f in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "summary.json"):
        assert (d / f).is_file(), f
    s = summary(tmp_path, "r")
    for k in ("knn20", "knn_init", "linear_top1", "uniformity", "wall_time_s", "images_per_s"):
        assert k in s, k
    assert s["objective"] == objective and s["predictor"] == predictor
    assert s["beta_tab3"] == {"raft": -1.0, "byol": 0.0}[objective]  # Tab. 3's signed β
    steps = [m for m in metrics(tmp_path, "r") if "loss" in m]
    assert len(steps) == 8 and all(0 <= m["loss_align"] <= 4 and 0 <= m["loss_cross"] <= 4 for m in steps)
    if objective == "raft":  # Eq. 11 with α = β = 1: loss = L_align - L_cross
        assert all(abs(m["loss"] - (m["loss_align"] - m["loss_cross"])) < 1e-4 for m in steps)
    # Tab. 1: L_align(q∘f) and L_uniform(f) every epoch; summary = their mean over the last (up to 10) epochs
    per_epoch = [m for m in metrics(tmp_path, "r") if "align_qf" in m]
    assert [m["epoch"] for m in per_epoch] == [1, 2] and s["last10_epochs"] == [1, 2]
    assert abs(s["align_qf_last10"] - sum(m["align_qf"] for m in per_epoch) / 2) < 1e-5
    assert abs(s["uniform_f_last10"] - sum(m["uniform_f"] for m in per_epoch) / 2) < 1e-5
    assert all(m["uniform_f"] < 0 for m in per_epoch)  # Eq. 3 is the log of a mean of values <= 1


def test_exact_resume_equals_uninterrupted_run(tmp_path):
    more = ["optim.epochs=2", "eval.linear=none", "loss.tangential=true", "model.same_init=false"]
    S.assert_resume_exact(tmp_path, *more, parts=("online", "target", "tab1"), cuts=(4,))  # at epoch 0's end
    for cut in ("cut4",):  # the epoch means of L_align(q∘f), L_uniform(f) (Tab. 1) continue exactly
        sa, sb = summary(tmp_path, "full"), summary(tmp_path, cut)
        assert sa["align_qf_last10"] == sb["align_qf_last10"] and sa["uniform_f_last10"] == sb["uniform_f_last10"]


def test_independent_init_differs_from_copy(tmp_path):
    """same_init: true -> the MT starts as the online network's copy; false -> an independent draw."""
    run(tmp_path, "checkpoint.stop_after_step=1", "optim.lr=0", name="copy")
    run(tmp_path, "checkpoint.stop_after_step=1", "optim.lr=0", "model.same_init=false", name="indep")
    for name, same in (("copy", True), ("indep", False)):
        ck = params(tmp_path, name)
        w_online, w_target = ck["online"]["f.conv1.weight"], ck["target"]["0.conv1.weight"]
        assert torch.equal(w_online, w_target) == same, name


@pytest.mark.slow  # the DDP machinery is common (2 vs 1 in default runs: byol_uniform, msbreg, decorr)
def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    """Same global batch (fixed views), the first step with 1 and with 2 processes (Gloo, SyncBN): the same
    losses and update (the tolerances: ``Script.assert_two_processes_equal_one``; a run without SyncBN,
    ``model.sync_bn=false``, fails it).

    SGD, not the quickstart's Adam: Adam divides the round-off-level gradient of the projector's bias before
    BN (zero in exact arithmetic) by its own tiny running norm, which turns float noise into lr-sized steps."""
    common = [*FIXED_VIEWS, "optim.name=sgd", "optim.lr=0.01"]
    S.assert_two_processes_equal_one(tmp_path, *common, keys=("loss", "loss_align", "loss_cross"))


def test_seed_list_runs_each_seed_and_summarises(tmp_path):
    run(tmp_path, "seeds=[3,4]", "eval.linear=none", name="s")
    s3, s4, agg = summary(tmp_path, "s/seed3"), summary(tmp_path, "s/seed4"), summary(tmp_path, "s")
    assert (s3["seed"], s4["seed"]) == (3, 4) and agg["seeds"] == [3, 4]
    vals = [s3["knn20"], s4["knn20"]]
    assert abs(agg["knn20"]["mean"] - sum(vals) / 2) < 1e-9
    assert abs(agg["knn20"]["std"] - abs(vals[0] - vals[1]) / 2 ** 0.5) < 1e-9  # sample std of two values
    assert "align_qf_last10" in agg and "uniform_f_last10" in agg


@pytest.mark.parametrize("objective,predictor,collapses", [("byol", "none", True), ("raft", "mlp", False)])
def test_a_collapse_prints_one_warning_and_a_healthy_run_none(tmp_path, objective, predictor, collapses):
    """The collapse signal: every log step records proj_std (std of the l2-normalised online projections, about
    1/sqrt(16) = 0.25 at init here); BYOL-NP (no predictor, a collapse case of Tab. 1) falls under 0.1/sqrt(16) within
    20 steps at lr 1e-2 (measured: 0.13 at step 2, 0.009 at step 20) and the run prints one warning line, once;
    RAFT-MLPP on the same settings stays near 0.09 and prints none. Both from the default init
    (``model.zero_init_residual=false``), where these numbers were measured."""
    p = run(tmp_path, f"loss.objective={objective}", f"model.predictor={predictor}", "optim.lr=1e-2",
            "model.zero_init_residual=false", "optim.epochs=5", "log.every=2", "eval.every=0", "eval.linear=none",
            name=objective)
    steps = [m for m in metrics(tmp_path, objective) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(2, 21, 2)) and all(0 <= m["proj_std"] < 1 for m in steps)
    warnings = [line for line in p.stdout.splitlines() if line.startswith("warning: the online projections")]
    assert len(warnings) == (1 if collapses else 0), p.stdout[-3000:]
    if collapses:
        m = re.fullmatch(r"warning: the online projections collapsed: proj_std (\S+) < 0\.1/sqrt\(16\) = 0\.025 over "
                         r"steps (\d+)-(\d+) \(.*\).*", warnings[0])
        assert m and float(m[1]) < 0.025 and int(m[3]) - int(m[2]) == 1, warnings
        at = next(x for x in steps if x["step"] == int(m[3]))
        assert at["proj_std"] <= float(m[1]) * 1.001  # the interval's largest value is at least the logged one
    else:
        assert min(m["proj_std"] for m in steps) > 0.05, steps


def test_bad_inputs_stop_with_one_clear_line(tmp_path):
    line = one_clear_line(run(tmp_path, "loss.beta=-1", check=False))  # Tab. 3's notation given to Eq. 11's β
    assert "loss.beta" in line and "objective=raft beta=1" in line
    line = one_clear_line(run(tmp_path, "model.predictor=linar", check=False))
    assert "model.predictor" in line and "linear_identity_init" in line
    for bad, words in (("loss.objective=byol_primes", ("loss.objective", "byol_prime")),
                       ("loss.tangental=true", ("loss.tangental", "Did you mean 'loss.tangential'")),
                       ("optim.schedule=step", ("optim.schedule", "constant"))):
        with pytest.raises(UserError) as e:
            _parse(["--config", str(QUICK), "--set", bad], raft.DEFAULTS, raft.CHOICES, method=raft.METHOD)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_seeds_are_checked_like_seed_at_parse_time(tmp_path):
    """Integers, >= 0, distinct: one line before anything runs (a non-integer crashed after the run folder was
    made, -1 trained, [0, 0] trained seed 0 and then stopped)."""
    for bad, shown in (("[a]", "['a']"), ("[-1]", "[-1]"), ("[0,0]", "[0, 0]"), ("[1.5]", "[1.5]"),
                       ("[true]", "[True]"), ("[2,1,2]", "[2, 1, 2]")):
        with pytest.raises(UserError) as e:
            _parse(["--config", str(QUICK), "--set", f"seeds={bad}"], raft.DEFAULTS, raft.CHOICES, method=raft.METHOD)
        assert str(e.value).startswith(f"config key 'seeds' = {shown} is out of range: allowed x >= 0, integers, "
                                       "distinct"), str(e.value)
    assert _parse(["--config", str(QUICK), "--set", "seeds=[2,0]"], raft.DEFAULTS, raft.CHOICES,
                  method=raft.METHOD).seeds == [2, 0]
    line = one_clear_line(run(tmp_path, "seeds=[a]", name="s", check=False))
    assert "config key 'seeds'" in line and not (tmp_path / "raft").exists()  # no run folder left


# ---------------------------------------------------------------------------------------- paper configs
TAB = {  # file: (objective, predictor, tangential, β of Eq. 9-11, β as Tab. 3 writes it)
    "byol-mlpp": ("byol", "mlp", False, 1.0, 0.0), "byolprime-mlpp": ("byol_prime", "mlp", False, 1.0, 1.0),
    "raft-mlpp": ("raft", "mlp", False, 1.0, -1.0), "byol-lp": ("byol", "linear", False, 1.0, 0.0),
    "byolprime-lp": ("byol_prime", "linear", False, 1.0, 1.0), "raft-lp": ("raft", "linear", False, 1.0, -1.0),
    "byol-np": ("byol", "none", False, 1.0, 0.0), "byolprime-np": ("byol_prime", "none", False, 1.0, 1.0),
    "raft-np": ("raft", "none", False, 1.0, -1.0), "tanbyol-lp": ("byol", "linear", True, 1.0, 0.0),
    "tanbyolprime-lp": ("byol_prime", "linear", True, 1.0, 1.0), "tanraft-lp": ("raft", "linear", True, 1.0, -1.0),
    "byol-lpi": ("byol", "linear_identity_init", False, 1.0, 0.0),
    "raft-mlpp_beta0.1": ("raft", "mlp", False, 0.1, -0.1), "raft-mlpp_beta10": ("raft", "mlp", False, 10.0, -10.0),
    "raft-lp_beta0.1": ("raft", "linear", False, 0.1, -0.1), "raft-lp_beta10": ("raft", "linear", False, 10.0, -10.0),
    "raft-np_beta10": ("raft", "none", False, 10.0, -10.0), "raft-np_beta100": ("raft", "none", False, 100.0, -100.0),
    "byolprime-np_beta10": ("byol_prime", "none", False, 10.0, 10.0),
    "byolprime-np_beta100": ("byol_prime", "none", False, 100.0, 100.0),
    "rand-baseline": ("raft", "linear", False, 1.0, -1.0),
}


def test_every_table_row_has_a_config_with_the_app_b_setup():
    files = {p.stem for p in (ROOT / "configs" / "raft").glob("*.yaml") if not p.stem.startswith("fashion_mnist")}
    files -= {"_app_b"}  # (the base of the App. B configs; fashion_mnist*: the CPU table's setting, not a paper's)
    assert files == set(TAB)
    for stem, (obj, pred, tan, beta, beta_tab3) in TAB.items():
        cfg = parse(["--config", str(ROOT / "configs" / "raft" / f"{stem}.yaml")], raft.DEFAULTS, raft.CHOICES,
                    method=raft.METHOD)
        assert (cfg.loss.objective, cfg.model.predictor, cfg.loss.tangential, cfg.loss.beta) == (obj, pred, tan, beta)
        assert cfg.loss.alpha == 1.0 and raft.SIGN.get(obj, 0.0) * cfg.loss.beta == beta_tab3, stem
        assert cfg.name == stem and cfg.seeds == [0, 1, 2]
        assert (cfg.data.name, cfg.data.image_size, cfg.model.arch) == ("cifar10", 96, "resnet18")
        assert (cfg.model.proj_hidden, cfg.model.proj_dim, cfg.model.pred_hidden, cfg.model.pred_norm) == \
            (512, 128, 512, "none")
        o = cfg.optim
        assert (o.name, o.lr, o.lr_scaling, o.batch_size, o.schedule) == \
            ("adam", 0.0 if stem == "rand-baseline" else 3e-4, "none", 128, "constant")
        assert o.epochs == (10 if stem == "rand-baseline" else 300)
        assert (cfg.ema.tau, cfg.ema.schedule) == (0.996, "constant")
        assert (cfg.eval.linear_epochs, cfg.eval.linear_lr, cfg.eval.crop) == (100, 5e-4, 1.0)  # App. B: no crop


def test_app_b_eval_loaders_see_the_whole_32_px_image_resized_to_96(monkeypatch):
    """App. B: "Each image is resized from 32 x 32 to 96 x 96"; the authors' load_testset has no crop: the eval
    loaders resize the whole 32 x 32 image (eval.crop 1.0), not BYOL-MHE App. B.2's 28 x 28 centre crop."""
    import torchvision.transforms.v2.functional as TF

    from common import data, loaders
    cfg = parse(["--config", str(ROOT / "configs" / "raft" / "raft-mlpp.yaml"), "--set", "eval.knn_k=[2]"],
                raft.DEFAULTS, raft.CHOICES, method=raft.METHOD)  # (4 images in the memory bank)
    assert cfg.eval.crop == 1.0 and raft.DEFAULTS["eval"]["crop"] == 1.0
    images = torch.randint(64, 192, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[..., :2, :] = 0  # a border that a 28 x 28 centre crop would cut away
    monkeypatch.setattr(loaders, "load", lambda d, split, transform=None: data.TensorImages(images, torch.zeros(4),
                                                                                         transform))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in data.stats("cifar10"))
    ref = TF.resize(images, [96, 96], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    for split in ("test", "train"):  # test set and kNN memory bank / probe training set
        x, _ = next(iter(loaders.eval_loaders(cfg)[split]))
        assert x.shape == (4, 3, 96, 96)
        torch.testing.assert_close(x, (ref / 255 - mean) / std, atol=1e-6, rtol=0)
    # the other methods' default crop (28/32) is still there on request
    cfg.eval.crop = 28 / 32
    x, _ = next(iter(loaders.eval_loaders(cfg)["test"]))
    ref28 = TF.resize(images[..., 2:30, 2:30], [96, 96], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(x, (ref28 / 255 - mean) / std, atol=1e-6, rtol=0)
