"""msbreg.py end to end as a user runs it (subprocesses): smoke run with every logged term, DDP equivalence
(global-batch covariance, process-count-independent Brownian noise), exact resume (the noise stream is in the
checkpoint), clear errors; every shipped config and sweep line resolves; (slow) the quickstart's learning check."""
import json

import pytest
import torch
import yaml

from common.config import parse

import msbreg as ms
from scriptrun import FIXED_VIEWS, ROOT, Script, config_error, one_clear_line

QUICK = ROOT / "configs" / "quickstart" / "msbreg.yaml"
TINY = ["data.synthetic.train_size=128", "data.synthetic.test_size=64", "model.width=8", "model.proj_hidden=32",
        "model.proj_dim=16", "model.pred_hidden=32", "optim.batch_size=32", "optim.epochs=1",
        "optim.warmup_epochs=0", "eval.linear_epochs=2", "log.every=1", "eval.knn_k=[100,20,5]"]
S = Script("msbreg", TINY, extra=["log.progress=false"])
run, metrics, params = S.run, S.metrics, S.checkpoint


def test_smoke_run_writes_every_output_and_logs_each_term(tmp_path):
    run(tmp_path, "loss.K=4")
    d = tmp_path / "msbreg" / "r"
    for f in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "summary.json"):
        assert (d / f).is_file(), f
    s = json.loads((d / "summary.json").read_text())
    for k in ("knn100", "knn20", "knn5", "knn5_majority", "knn_init", "linear_top1", "alignment", "uniformity",
              "feature_std", "wall_time_s", "images_per_s"):
        assert k in s, k
    assert s["K"] == 4 and s["knn_k"] == 100 and s["knn_t"] == 0.1
    steps = [m for m in metrics(tmp_path, "r") if "loss" in m]
    assert len(steps) == 4  # 128 / 32 = 4 steps
    for m in steps:  # Eq. 2 from its logged terms; L_c in [0, 4], L_b in [-1, 1], L_s >= 0
        assert abs(m["loss"] - (m["loss_c"] + 0.004 * m["loss_s"] + 0.5 * m["loss_b"])) < 1e-4
        assert 0 <= m["loss_c"] <= 4 and -1 <= m["loss_b"] <= 1 and m["loss_s"] >= 0
    # App. 7.1: peak lr = base x batch/256 x K (no warm-up here: the first step runs at the peak)
    base = yaml.safe_load((d / "config.yaml").read_text())["optim"]["lr"]
    assert abs(steps[0]["lr"] - base * 32 / 256 * 4) < 1e-6
    ck = params(tmp_path, "r")
    assert "noise" in ck and "generator" in ck["noise"]  # the Brownian stream is saved


def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    """Same global batch (fixed views), the first step with 1 and with 2 processes: Gloo SyncBN, L_s over the
    global batch, and the same Brownian noise per image (drawn for the global batch, rank r keeps rows r, r+2,
    ...). λ_s raised so the covariance term matters (the tolerances: ``Script.assert_two_processes_equal_one``)."""
    common = [*FIXED_VIEWS, "optim.lr=0.025", "loss.K=2", "loss.lambda_s=0.05"]
    a, b = S.assert_two_processes_equal_one(tmp_path, *common, keys=("loss", "loss_c", "loss_s", "loss_b"))
    assert torch.equal(a["noise"]["generator"], b["noise"]["generator"])


@pytest.mark.slow  # 14 s; MSBReg's 2-process test stays in the default suite, as one exactness check per script
def test_exact_resume_equals_uninterrupted_run(tmp_path):
    more = ["optim.epochs=2", "eval.linear=none", "loss.K=2"]
    a, b = S.assert_resume_exact(tmp_path, *more, parts=("online", "target"), cuts=(3,))  # mid-epoch 0
    assert torch.equal(a["noise"]["generator"], b["noise"]["generator"])


def test_bad_inputs_stop_with_one_clear_line(tmp_path):
    line = config_error("msbreg", "loss.K=1")
    assert "'loss.K' = 1 is out of range: allowed x >= 2" in line
    line = one_clear_line(run(tmp_path, "loss.K=4", "loss.centroid=false", check=False))
    assert "loss.centroid=false" in line
    run(tmp_path, "checkpoint.stop_after_step=1", "loss.K=2", name="k")
    line = one_clear_line(run(tmp_path, "resume=auto", "loss.K=4", name="k", check=False))
    assert "loss.K: 2 -> 4" in line and "config.yaml" in line


def test_bad_method_keys_are_one_line_config_errors(capsys):
    for sets, expect in ((["model.head_norm=batch"], ("model.head_norm", "bn, ln, none")),
                         (["loss.lambda_x=1"], ("loss.lambda_x", "Valid keys under 'loss'")),
                         (["loss.K=four"], ("'loss.K' expects int",))):
        with pytest.raises(SystemExit) as e:
            parse(["--config", str(QUICK), "--set", *sets], ms.DEFAULTS, ms.CHOICES, method=ms.METHOD)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and all(x in err[0] for x in expect), err


def _sweep_lines(path):
    out = []
    for raw in path.read_text().splitlines():
        body, _, comment = raw.partition("#")
        if body.strip():
            cfg, name, *sets = body.split()
            out.append((cfg, name, sets, comment))
    return out


def _parse(config, sets=()):
    return parse(["--config", str(ROOT / config), "--set", *sets] if sets else ["--config", str(ROOT / config)],
                 ms.DEFAULTS, ms.CHOICES, method=ms.METHOD)


def test_paper_configs_resolve_to_the_paper_settings():
    for f in sorted((ROOT / "configs" / "msbreg").glob("*.yaml")):
        _parse(f.relative_to(ROOT))
    c = _parse("configs/msbreg/imagenet100_resnet18_320ep_k4.yaml")
    assert (c.data.name, c.model.arch, c.optim.epochs, c.optim.batch_size, c.optim.lr) == \
        ("imagenet100", "resnet18", 320, 512, 0.4)
    assert (c.model.proj_hidden, c.model.proj_dim, c.model.pred_hidden) == (512, 128, 512)  # App. 7.2
    assert (c.optim.name, c.optim.weight_decay, c.optim.warmup_epochs) == ("lars", 1e-5, 10)  # App. 7.1
    assert c.augment.blur_p == [1.0] and c.augment.solarize_p == [0.2]  # Tab. 9, every view
    assert (c.loss.K, c.loss.lambda_s, c.loss.lambda_b) == (4, 0.004, 0.5)
    assert _parse("configs/msbreg/imagenet100_resnet18_320ep_k8.yaml").loss.K == 8
    s = _parse("configs/msbreg/stl10_resnet18_320ep_k8.yaml")
    assert (s.data.name, s.optim.lr, s.loss.K) == ("stl10", 0.5, 8)
    i = _parse("configs/msbreg/imagenet_resnet50_300ep_k4.yaml")
    assert (i.data.name, i.model.arch, i.optim.epochs, i.optim.lr) == ("imagenet", "resnet50", 300, 0.15)
    assert 5 in c.eval.knn_majority_k and {20, 200} <= set(i.eval.knn_k)  # Tab. 1 5-NN, Tab. 4 20/200-NN


def test_tab11_sweep_is_the_full_grid_over_one_base_config():
    lines = _sweep_lines(ROOT / "configs" / "msbreg" / "tab11.sweep")
    cells = set()
    for cfg, name, sets, comment in lines:
        assert cfg == "configs/msbreg/tab11_base.yaml" and "paper:" in comment
        c = _parse(cfg, [f"name={name}", *sets])
        assert c.optim.epochs == 300 and c.data.name == "imagenet100"
        assert c.loss.centroid == (c.loss.K != 2)  # App. 10: "K = 2 is the same as BYOL setting" (Eq. 1)
        cells.add((c.loss.K, c.loss.lambda_s, c.loss.lambda_b))
    assert len(lines) == len(set(n for _, n, _, _ in lines)) == 60  # unique run names
    assert cells == {(K, s, b) for K in (2, 4, 8) for s in (0, 0.002, 0.004, 0.01) for b in (0, 0.25, 0.5, 1.0, 2.0)}


def test_tab8_and_tab13_sweeps_resolve():
    rows8 = [_parse(cfg, [f"name={n}", *sets]) for cfg, n, sets, _ in
             _sweep_lines(ROOT / "configs" / "msbreg" / "tab8.sweep")]
    assert len(rows8) == 12
    assert {(c.loss.centroid, c.loss.K, c.loss.lambda_s > 0, c.loss.lambda_b > 0) for c in rows8} == \
        {(cen, K, s, b) for cen, K in ((False, 2), (True, 4), (True, 8)) for s in (0, 1) for b in (0, 1)}
    rows13 = [_parse(cfg, [f"name={n}", *sets]) for cfg, n, sets, _ in
              _sweep_lines(ROOT / "configs" / "msbreg" / "tab13.sweep")]
    assert len(rows13) == 8 and sum(c.model.head_norm == "ln" for c in rows13) == 6
    assert all(c.data.name == "stl10" and c.optim.batch_size in (256, 1024) for c in rows13)


def test_each_evaluation_encodes_the_test_images_once(tmp_path, monkeypatch):
    """The script's own diagnostics (here the singular values of Eq. 5-7) reuse the test features the kNN
    evaluation extracted (the ``diagnostics(f_test)`` given to ``Run.resume_or_evaluate_init``): a run with two
    evaluations (random init, end) encodes the training and the test images twice each, not the test images a third
    and a fourth time."""
    import common.evaluate as ev
    real, calls = ev.extract_features, []

    def counted(encoder, loader, *a, **k):
        calls.append(len(loader.dataset) if hasattr(loader, "dataset") else None)
        return real(encoder, loader, *a, **k)
    monkeypatch.setattr(ev, "extract_features", counted)
    monkeypatch.setattr(ms, "extract_features", counted)
    cfg = parse(["--set", *TINY, "eval.linear=none", "eval.knn_majority_k=[]", "log.progress=false",
                 f"out_dir={tmp_path}", "name=r"], ms.DEFAULTS, ms.CHOICES, method="msbreg")
    ms.train(cfg)
    assert sorted(calls) == [64, 64, 128, 128], calls  # (test, train) at step 0 and at the end
    s = json.loads((tmp_path / "msbreg" / "r" / "summary.json").read_text())
    assert s["sv_dist_test"] > 0 and s["sv_max_test"] >= s["sv_min_test"] >= 0
