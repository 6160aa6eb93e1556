"""``python -m common.tools.evaluate`` as a user runs it (subprocesses): it reproduces a finished run's summary.json
on 1 and 2 processes, writes <checkpoint>.eval.json, prints one line; bad input is one clear line and exit status 2."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from test_byol_uniform_run import S  # the tiny byol_uniform run of its own tests

from common.tools.evaluate import main

from scriptrun import ROOT, one_clear_line

SAME = ("knn20", "uniformity", "center_norm", "feature_std", "linear_top1", "linear_top5", "linear_protocol")


def evaluate(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "common.tools.evaluate", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs: the fast linear probe and the paper (augmented) one."""
    tmp = tmp_path_factory.mktemp("evalcli")
    S.run(tmp, name="fast")
    S.run(tmp, "eval.linear=paper", "eval.linear_batch_size=32", name="paper")
    return tmp


def _eval_json(run_dir, checkpoint="last"):
    return json.loads((run_dir / "checkpoints" / f"{checkpoint}.eval.json").read_text())


@pytest.mark.parametrize("nproc", [1, 2])
def test_reproduces_the_runs_summary(runs, nproc):
    """Same settings, same numbers, exactly: every image goes through the encoder in the batch it had in
    training's final evaluation (sharded or not), kNN and the seeded fast probe are deterministic on CPU."""
    d = S.folder(runs, "fast")
    target = d if nproc == 1 else d / "checkpoints" / "last.pt"  # a run folder or a checkpoint
    p = evaluate(target, "--set", f"dist.nproc={nproc}")
    summary, got = S.summary(runs, "fast"), _eval_json(d)
    assert {k: got[k] for k in SAME} == {k: summary[k] for k in SAME}
    assert got["linear_protocol"] == "fast (offline)" and got["processes"] == nproc
    assert (got["step"], got["epoch"], got["knn_k"], got["knn_t"], got["linear"]) == (summary["steps"], 1, 20,
                                                                                       0.1, "fast")
    assert got["checkpoint"] == str((d / "checkpoints" / "last.pt").resolve())
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and f"knn20 {summary['knn20']:.2f}" in lines[0] and "last.eval.json" in lines[0], p.stdout
    print(lines[0])


def test_paper_probe_reproduced_and_overrides(runs):
    d = S.folder(runs, "paper")
    evaluate(d)  # the run's own settings: the augmented probe, 1 process as in training
    summary, got = S.summary(runs, "paper"), _eval_json(d)
    assert {k: got[k] for k in SAME} == {k: summary[k] for k in SAME}
    assert got["linear_protocol"] == "paper (offline)"
    p = evaluate(d, "--set", "eval.linear=fast", "eval.knn_k=[5,20]", "eval.knn_t=0.2")
    got = _eval_json(d)
    assert got["linear_protocol"] == "fast (offline)" and got["eval"]["knn_t"] == 0.2 and "knn20" in got
    assert got["overrides"] == ["eval.linear=fast", "eval.knn_k=[5,20]", "eval.knn_t=0.2"]
    assert "knn20" in p.stdout and "T=0.2" in p.stdout


def test_each_checkpoint_of_a_series_keeps_its_own_result(tmp_path):
    """epoch_0001.pt evaluated, then last.pt (epoch 2), then the run folder (last.pt again): the first result stays."""
    S.run(tmp_path, "optim.epochs=2", "checkpoint.keep_every=1", "eval.linear=none", name="series")
    d = S.folder(tmp_path, "series")
    evaluate(d / "checkpoints" / "epoch_0001.pt")
    first = _eval_json(d, "epoch_0001")
    evaluate(d / "checkpoints" / "last.pt")
    evaluate(d, "--set", "eval.knn_k=[5]")
    assert _eval_json(d, "epoch_0001") == first and first["epoch"] == 1
    assert first["checkpoint"] == str((d / "checkpoints" / "epoch_0001.pt").resolve())
    last = _eval_json(d, "last")
    assert last["epoch"] == 2 and last["overrides"] == ["eval.knn_k=[5]"] and "knn5" in last
    assert sorted(p.name for p in (d / "checkpoints").glob("*.json")) == ["epoch_0001.eval.json", "last.eval.json"]


def _in_process(capsys, *args):
    """Bad input stops before any evaluation: run the command's ``main`` here, without a new interpreter."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return SimpleNamespace(returncode=e.value.code, stderr=capsys.readouterr().err)


def test_bad_input_is_one_clear_line(runs, tmp_path, capsys):
    d = S.folder(runs, "fast")
    line = one_clear_line(evaluate(d, "--set", "eval.knn_kk=5", check=False))  # as a user sees it
    assert "eval.knn_kk" in line and "Did you mean 'eval.knn_k'" in line
    line = one_clear_line(_in_process(capsys, d, "--set", "eval.knn_t=warm"))
    assert "'eval.knn_t' expects float" in line
    line = one_clear_line(_in_process(capsys, tmp_path / "no_such_run"))
    assert "no checkpoint at" in line and str(tmp_path / "no_such_run") in line
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    line = one_clear_line(_in_process(capsys, tmp_path / "bad.pt"))
    assert "corrupt" in line
    before = (d / "checkpoints" / "last.pt").read_bytes()
    line = one_clear_line(_in_process(capsys, d, "--set", "model.width=16", "device=cpu"))
    assert "does not fit" in line and "model.width=16" in line
    assert (d / "checkpoints" / "last.pt").read_bytes() == before


def test_a_file_that_is_not_a_checkpoint_gets_evaluates_hint_not_a_training_runs(tmp_path, capsys):
    import torch
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "backbone.pt")
    for f in ("bad.pt", "backbone.pt"):
        line = one_clear_line(_in_process(capsys, tmp_path / f))
        assert "resume=" not in line and "pass a checkpoint written by one of the six scripts" in line, line
