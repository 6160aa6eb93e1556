"""decorr_nostopgrad.py end to end as a user runs it (subprocesses): smoke run with its diagnostics, DDP
equivalence (per-device partitions and partitions spanning devices), exact resume, clear errors, the
configs, and (slow) the Tab. 3 collapse rows at quickstart scale (the quickstart's learning check:
tests/test_readme_quickstart.py)."""

import pytest
import torch

from common.config import parse

import decorr_nostopgrad as dn
from scriptrun import FIXED_VIEWS, ROOT, Script, config_error, one_clear_line

QUICK = ROOT / "configs" / "quickstart" / "decorr_nostopgrad.yaml"
TINY = ["data.synthetic.train_size=128", "data.synthetic.test_size=64", "model.width=8", "model.proj_hidden=32",
        "model.proj_dim=16", "optim.batch_size=32", "optim.epochs=1", "optim.warmup_epochs=0",
        "eval.linear_epochs=2", "log.every=1", "loss.partitions=4", "eval.knn_k=[20]"]
S = Script("decorr_nostopgrad", TINY)
run, rundir, metrics, summary, ckpt = S.run, S.folder, S.metrics, S.summary, S.checkpoint


def test_smoke_run_writes_outputs_diagnostics_and_W_p(tmp_path):
    run(tmp_path)
    d = rundir(tmp_path, "r")
    for f in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "summary.json", "predictor/W_p_epoch_0001.pt"):
        assert (d / f).is_file(), f
    s = summary(tmp_path, "r")
    for k in ("knn20", "knn_init", "linear_top1", "corr_dist", "wp_asym", "wp_eig_re_max", "wp_eig_small_frac",
              "corr_dist_proj", "feature_std_rel", "proj_std_rel", "collapsed", "wall_time_s", "images_per_s"):
        assert k in s, k
    assert 0 <= s["corr_dist"] <= 64 * 64 and isinstance(s["collapsed"], bool)  # width 8: 64 backbone dims
    assert 0 <= s["corr_dist_proj"] <= 16 * 16  # Fig. 1 on the projector outputs f (proj_dim 16)
    steps = [m for m in metrics(tmp_path, "r") if "loss" in m]
    assert len(steps) == 4 and all(abs(m["loss"] - m["loss_inv"] - m["loss_cov"]) < 1e-3 * m["loss"] for m in steps)
    state = ckpt(tmp_path, "r")  # W_p in the checkpoint (Fig. 3) and saved at the evaluation of epoch 1
    saved = torch.load(d / "predictor" / "W_p_epoch_0001.pt", weights_only=True)
    assert torch.equal(saved["W_p"], state["online"]["W_p.weight"]) and saved["eigvals"].shape == (16,)


@pytest.mark.slow  # default suite under 10 minutes on 2 cores; CI runs it (.ci/run)
@pytest.mark.parametrize("k", [4, 1])  # 4: two partitions per process;
# 1: one partition spans both processes
def test_ddp_two_gloo_processes_equal_one_process(tmp_path, k):
    """Same global batch (fixed views), the first step with 1 and with 2 processes: SyncBN, synchronised
    standardisation (Eq. 18), per-device partitions (§4.4) or gathered predictions; the loss and the step's
    update must agree (the tolerances: ``Script.assert_two_processes_equal_one``). A run without SyncBN
    (``model.sync_bn=false``) fails this test."""
    common = [*FIXED_VIEWS, "optim.lr=0.002", f"loss.partitions={k}"]
    S.assert_two_processes_equal_one(tmp_path, *common)


def test_exact_resume_equals_uninterrupted_run(tmp_path):
    more = ["optim.epochs=2", "eval.linear=none"]
    S.assert_resume_exact(tmp_path, *more, cuts=(3,))  # stopped mid-epoch 0 (4 steps/epoch)


def test_bad_inputs_stop_with_one_clear_line(tmp_path):
    line = config_error("decorr_nostopgrad", "loss.c_invv=1")
    assert "loss.c_invv" in line and "Did you mean 'loss.c_inv'" in line
    line = config_error("decorr_nostopgrad", "loss.std_var=sample")
    assert "loss.std_var" in line and "unbiased" in line
    line = one_clear_line(run(tmp_path, "loss.partitions=5", check=False))  # 32 images do not split into 5
    assert "loss.partitions=5" in line and "optim.batch_size=32" in line
    ck = rundir(tmp_path, "c") / "checkpoints" / "last.pt"
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b"\x00garbage")
    line = one_clear_line(run(tmp_path, "resume=auto", name="c", check=False))
    assert "corrupt" in line and ck.read_bytes() == b"\x00garbage"


TAB3 = {  # Decorr Tab. 3 as we read §5.4: (c_cov, STD, I-PRED, STOPGRAD) -> paper result
    1: (0, False, False, False, "COLLAPSE"), 2: (1, False, False, False, "COLLAPSE"), 3: (0, True, False, False, 50.9),
    4: (1, True, False, False, 61.4), 5: (0, False, True, False, "COLLAPSE"), 6: (1, False, True, False, 62.6),
    7: (0, True, True, False, 50.9), 8: (1, True, True, False, 58.7), 9: (0, True, False, True, 55.0)}


def test_paper_configs_parse_and_hold_the_table_values():
    cfgs = {p.stem: parse(["--config", str(p)], dn.DEFAULTS, dn.CHOICES, method=dn.METHOD)
            for p in (ROOT / "configs" / "decorr_nostopgrad").glob("*.yaml")}
    for row, (cc, std, ipred, sg, _) in TAB3.items():
        (name,) = [n for n in cfgs if n.startswith(f"tab3_row{row}_")]
        L = cfgs[name].loss
        assert (L.partitions, L.c_inv, L.c_cov, L.standardize, L.identity_predictor, L.stopgrad) == \
            (1, 1.0, cc, std, ipred, sg), name
    c = cfgs["tab4_ours_p8192x3"]
    assert ((c.model.proj_hidden, c.model.proj_dim, c.loss.partitions, c.loss.c_inv, c.loss.c_cov)
            == (8192, 8192, 8, 25, 8))
    assert c.model.arch == "resnet50" and c.model.zero_init_residual and c.optim.batch_size == 2048
    assert (c.optim.lr, c.optim.epochs, c.optim.warmup_epochs, c.eval.linear_lr, c.eval.linear_epochs) == \
        (0.3, 100, 10, 0.3, 100)
    assert (cfgs["tab4_ours_p4096-256"].model.proj_layers, cfgs["tab4_ours_p4096-256"].model.proj_dim) == (2, 256)
    assert sum(n.startswith("tab1_") for n in cfgs) == 7 and sum(n.startswith("tab2_") for n in cfgs) == 6
    d = parse([], dn.DEFAULTS, dn.CHOICES, method=dn.METHOD)  # DEFAULTS alone: §5.1's setting and probe
    assert (d.model.arch, d.model.cifar_stem, d.model.zero_init_residual) == ("resnet50", False, True)
    e = d.eval
    assert (e.linear, e.linear_optimizer, e.linear_batch_size, e.linear_weight_decay, e.linear_lr, e.linear_epochs) == \
        ("paper", "sgd", 256, 1e-6, 0.3, 100)
    a = cfgs["authors_code_imagenet_resnet50"]
    assert not a.loss.standardize and a.model.predictor_bias and a.loss.inv_norm == "mse"


# ----------------------------------------------------------------------------- slow: collapse
@pytest.mark.slow
@pytest.mark.parametrize("row", [1, 2, 5])
def test_tab3_collapsing_rows_report_collapse_as_a_result(tmp_path, row):
    """The rows Tab. 3 reports as COLLAPSE, at quickstart scale (k=1, c_inv=1, short): the run ends
    normally and summary.json says collapsed (the projector's l2-normalised outputs have ~0 std)."""
    cc, std, ipred, sg, paper = TAB3[row]
    assert paper == "COLLAPSE"
    run(tmp_path, "optim.epochs=4", "data.synthetic.train_size=2560", "eval.every=0", "eval.linear=none",
        "loss.partitions=1", "loss.c_inv=1", f"loss.c_cov={cc}", f"loss.standardize={str(std).lower()}",
        f"loss.identity_predictor={str(ipred).lower()}", f"loss.stopgrad={str(sg).lower()}", name=f"row{row}",
        tiny=False)
    s = summary(tmp_path, f"row{row}")
    assert s["collapsed"] and s["proj_std_rel"] < s["collapse_floor"], s
