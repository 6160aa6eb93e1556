"""common.checkpoint (atomic save, strict load, resume rules, RNG) and common.log (run folder, metrics)."""
import json
import os
import random

import pytest
import torch

from common import checkpoint, log
from common.config import BASE, Cfg, UserError


def test_atomic_save_and_load_round_trip(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    lin = torch.nn.Linear(2, 3)
    checkpoint.save(checkpoint.snapshot(Cfg.wrap(BASE), {"step": 3}, "m", model=lin), path)
    state = checkpoint.load(path)
    other = torch.nn.Linear(2, 3)
    assert checkpoint.restore(state, Cfg.wrap(BASE), model=other) == {"step": 3}
    assert torch.equal(other.weight, lin.weight)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(checkpoint.snapshot(Cfg.wrap(BASE), {"step": 1}, "m"), path)
    with pytest.raises(Exception):
        checkpoint.save({"step": 2, "bad": lambda: 0}, path)  # unpicklable: torch.save fails midway
    assert checkpoint.load(path)["counters"]["step"] == 1
    checkpoint.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        checkpoint.load(tmp_path / "foreign.pt")


def test_restore_refuses_a_checkpoint_of_another_setup(tmp_path):
    cfg = Cfg.wrap(BASE)
    state = checkpoint.snapshot(cfg, {"step": 1}, "m", model=torch.nn.Linear(2, 3))
    assert checkpoint.check_resume(state, cfg, "m") == {}
    with pytest.raises(UserError, match=r"written by m\.py, not other\.py"):
        checkpoint.check_resume(state, cfg, "other")
    other = Cfg.wrap(BASE)
    other.model.width = 16
    with pytest.raises(UserError, match=r"does not fit this run \(model.width: 64 -> 16\)"):
        checkpoint.check_resume(state, other, "m")
    other = Cfg.wrap(BASE)
    other.seed, other.augment.flip_p = 1, 0.0
    with pytest.raises(UserError, match=r"settings that alter training \(augment.flip_p: 0.5 -> 0.0, seed: 0 -> 1\)"):
        checkpoint.check_resume(state, other, "m")
    other.resume_allow_changes = True
    assert checkpoint.check_resume(state, other, "m") == {"augment.flip_p": [0.5, 0.0], "seed": [0, 1]}
    free = Cfg.wrap(BASE)  # where the run writes, logs and evaluates does not alter training
    free.log.every, free.eval.every, free.checkpoint.every, free.dist.nproc, free.data.root = 3, 9, 2, 4, "/x"
    assert checkpoint.check_resume(state, free, "m") == {}
    with pytest.raises(UserError, match="'model' does not fit"):
        checkpoint.restore(state, cfg, model=torch.nn.Linear(2, 4))


def test_corrupt_checkpoint_is_one_clear_error_and_untouched(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt or unreadable.*left untouched") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)
    assert path.read_bytes() == b"not a checkpoint at all"


def test_resume_rules(tmp_path):
    assert checkpoint.resume_path(tmp_path, "none") is None
    assert checkpoint.resume_path(tmp_path, "auto") is None
    (tmp_path / "checkpoints").mkdir()
    checkpoint.save({}, tmp_path / "checkpoints" / "last.pt")
    assert checkpoint.resume_path(tmp_path, "auto") == tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(UserError, match="already holds a checkpoint: set resume=auto"):
        checkpoint.resume_path(tmp_path, "none")  # never overwrite saved work silently
    with pytest.raises(UserError, match="no such checkpoint"):
        checkpoint.resume_path(tmp_path, str(tmp_path / "x.pt"))


def test_rng_state_round_trip():
    s = checkpoint.rng_state()
    a = (random.random(), torch.rand(3))
    checkpoint.set_rng_state(s)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_run_dir_unwritable_is_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = Cfg.wrap({**BASE, "out_dir": str(blocker / "runs"), "name": "r"})
    with pytest.raises(UserError, match="cannot write the run folder.*set out_dir="):
        log.run_dir(cfg, "m")
    cfg.out_dir = str(tmp_path / "runs")
    assert (log.run_dir(cfg, "m") / "checkpoints").is_dir()


def test_logger_metrics_summary_and_resume_truncation(tmp_path):
    lg = log.Logger(tmp_path)
    for s in (10, 20, 30):
        lg.log({"step": s, "loss": torch.tensor(1.0 / s)})
    lg.summary({"knn200": 50.0})
    assert json.loads((tmp_path / "summary.json").read_text())["knn200"] == 50.0
    log.Logger(tmp_path, resume_step=20)  # resuming from step 20 drops the lines past it
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20] and lines[0]["loss"] == pytest.approx(0.1)
    log.Logger(tmp_path / "other", enabled=False).log({"step": 1})  # non-main ranks write nothing
    assert not (tmp_path / "other").exists() or not os.listdir(tmp_path / "other")
