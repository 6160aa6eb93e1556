"""The baselines (common/tools/baselines.py) and the results-table command (common/tools/results.py) on tiny
synthetic runs: the random-init baseline is the initial encoder every run starts from; the table runs each
(cell, seed) once, resumes without re-running a finished one, writes mean ± std; missing data stop it before any
run with how to get them; the MHE energy it reads from a checkpoint is byol_mhe.py's own."""
import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml

from common.tools import results

ROOT = Path(__file__).resolve().parents[1]
TINY = {"device": "cpu", "data": {"name": "synthetic", "image_size": 16,
                                  "synthetic": {"train_size": 256, "test_size": 128, "size": 16, "classes": 4}},
        "model": {"arch": "resnet18", "width": 4}, "optim": {"batch_size": 64, "epochs": 1},
        "eval": {"knn_k": [20], "linear_epochs": 2, "batch_size": 128}, "log": {"every": 1}}


def _table(tmp_path, cells, data=None):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    table = {"out_dir": str(tmp_path / "runs"), "seeds": [0, 1], "threads": 1, "get_data": "apt-get install it",
             "data": data or {"name": "synthetic"},
             "cells": [{"name": n, "cmd": f"python {cmd} --config {cfg} --set {sets}"} for n, cmd, sets in cells]}
    path = tmp_path / "t.table"
    path.write_text(yaml.safe_dump(table))
    return path


class Done:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _results(table, *args, capsys, monkeypatch):
    """``python -m common.tools.results TABLE ARGS`` in this process (its runs are subprocesses, as for a user)."""
    monkeypatch.chdir(ROOT)
    code = 0
    try:
        results.main([str(table), *args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return Done(code, out.out, out.err)


@pytest.mark.slow  # default suite under 10 minutes on 2 cores; CI runs it (.ci/run)
def test_table_runs_each_cell_once_resumes_and_writes_mean_std(tmp_path, capsys, monkeypatch):
    io = dict(capsys=capsys, monkeypatch=monkeypatch)
    table = _table(tmp_path, [("random-init", "-m common.tools.baselines", "baseline=random"),
                              ("supervised", "-m common.tools.baselines", "baseline=supervised")])
    p = _results(table, "--seeds", "0", **io)  # a part: one seed
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("running") == 2 and "| random-init | 1 |" in p.stdout
    p = _results(table, **io)  # the rest: seed 1 only
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("running") == 2 and p.stdout.count("done ") == 2, p.stdout
    runs = tmp_path / "runs"
    s = {(c, k): json.loads((runs / c / m / f"seed{k}" / "summary.json").read_text())
         for c, m in (("random-init", "random"), ("supervised", "supervised")) for k in (0, 1)}
    for k in (0, 1):  # random-init: no step, evaluated as a run's end; its kNN is the initial encoder's
        r = s["random-init", k]
        assert r["steps"] == 0 and r["knn20"] == r["knn_init"] and "linear_top1" in r and "erank" in r
        assert s["supervised", k]["steps"] == 4 and s["supervised", k]["knn_init"] == r["knn_init"]  # same init
    rows = {r["cell"]: r for r in csv.DictReader(open(runs / "table.csv"))}
    knn = [s["supervised", k]["knn20"] for k in (0, 1)]
    assert float(rows["supervised"]["knn_mean"]) == pytest.approx(statistics.fmean(knn), rel=1e-5)
    assert float(rows["supervised"]["knn_std"]) == pytest.approx(statistics.stdev(knn), rel=1e-4, abs=1e-9)
    assert rows["supervised"]["seeds"] == "2" and rows["random-init"]["mhe_energy_mean"] == ""
    before = {f: f.stat().st_mtime_ns for f in runs.rglob("summary.json")}
    p = _results(table, **io)  # everything done: nothing runs, the same table
    assert p.returncode == 0 and "running" not in p.stdout and p.stdout.count("done ") == 4, p.stdout
    assert {f: f.stat().st_mtime_ns for f in runs.rglob("summary.json")} == before


def test_missing_data_stop_before_any_run_and_say_how_to_get_them(tmp_path, capsys, monkeypatch):
    io = dict(capsys=capsys, monkeypatch=monkeypatch)
    table = _table(tmp_path, [("random-init", "-m common.tools.baselines", "baseline=random")],
                   data={"name": "fashion_mnist", "root": str(tmp_path / "nodata")})
    p = _results(table, **io)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), p.stderr
    assert str(tmp_path / "nodata") in err[0] and "apt-get install it" in err[0]
    assert not (tmp_path / "runs").exists()


def test_mhe_energy_from_the_checkpoint_is_byol_mhe_s_own_and_random_init_is_every_run_s_start(tmp_path, capsys,
                                                                                                   monkeypatch):
    io = dict(capsys=capsys, monkeypatch=monkeypatch)
    table = _table(tmp_path, [("random-init", "-m common.tools.baselines", "baseline=random"),
                              ("byol_mhe", "byol_mhe.py", "model.proj_hidden=32 model.proj_dim=8 model.pred_hidden=32 "
                                                          "mhe.weight=1")])
    p = _results(table, "--seeds", "0", **io)
    assert p.returncode == 0, p.stderr
    folder = results.run_dir(tmp_path / "runs", "byol_mhe", 0)
    s = json.loads((folder / "summary.json").read_text())
    logged = [v for k, v in s.items() if k.startswith(("energy/projector", "energy/predictor"))]
    assert len(logged) == 4 and results.mhe_energy(folder) == pytest.approx(statistics.fmean(logged), rel=1e-6)
    r = json.loads((results.run_dir(tmp_path / "runs", "random-init", 0) / "summary.json").read_text())
    assert r["knn20"] == s["knn_init"]  # the random-init baseline is the encoder byol_mhe.py starts from


def test_fashion_mnist_table_cells_share_encoder_size_epochs_and_evaluation():
    """Every cell of configs/fashion_mnist.table resolves with its own script's defaults (no data needed), and all
    share the data, image size, encoder, epochs and evaluation; the floor and plain BYOL are what they say."""
    import importlib
    import shlex

    from common.config import parse
    t = results.load_table(ROOT / "configs" / "fashion_mnist.table")
    shared = {}
    for cell in t["cells"]:
        argv = shlex.split(cell["cmd"])
        module = argv[2] if argv[1] == "-m" else argv[1].removesuffix(".py")
        mod = importlib.import_module(module)
        config = str(ROOT / argv[argv.index("--config") + 1])
        c = parse(["--config", config], mod.DEFAULTS, getattr(mod, "CHOICES", None),
                  method="baselines" if module == "common.tools.baselines" else module)
        shared[cell["name"]] = (c.data.name, c.data.image_size, c.model.arch, c.model.width, c.model.cifar_stem,
                                c.optim.epochs, {k: v for k, v in c.eval.plain().items()
                                                  if k not in ("knn_majority_k", "crop")})  # (msbreg's: off;
        assert c.data.name == "fashion_mnist"  # eval.crop is CIFAR's: no effect on these images)
        if cell["name"] == "byol":
            assert module == "byol_uniform" and c.loss.lambda_uni == 0
        if cell["name"] == "random-init":
            assert c.baseline == "random"
        if cell["name"].startswith("msbreg"):  # K = 4 (the paper's default) and K = 2 (Tab. 11's BYOL setting)
            assert (c.loss.K, c.loss.centroid) == ((2, False) if cell["name"] == "msbreg_k2" else (4, True))
    assert all(v == shared["byol"] for v in shared.values()), {k: v for k, v in shared.items() if v != shared["byol"]}
    assert {"random-init", "byol", "supervised", "byol_uniform", "byol_mhe", "msbreg", "msbreg_k2", "raft",
            "decorr_nostopgrad", "center_penalty"} == set(shared)
