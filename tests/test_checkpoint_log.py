"""common.checkpoint (atomic save, strict load, resume rules, RNG) and common.log (run folder, metrics)."""
import json
import os
import pickle
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
    with pytest.raises((AttributeError, pickle.PicklingError)):  # a local lambda: which one depends on the Python
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


def _log_cfg(**log_settings):
    from common.config import merge
    return Cfg.wrap(merge(BASE, {"log": log_settings}))


@pytest.mark.parametrize("setting, tty, shown", [("auto", False, False), ("auto", True, True), (True, False, False),
                                                 (True, True, True), (False, True, False)])  # (a file: plain lines)
def test_log_progress_auto_true_false(tmp_path, monkeypatch, setting, tty, shown):
    monkeypatch.setattr("sys.stderr.isatty", lambda: tty)
    lg = log.Logger(tmp_path)
    lg.config(_log_cfg(progress=setting))
    bar = lg.progress(range(3), 3, "epoch 0")
    assert bar.disable is not shown and list(bar) == [0, 1, 2]
    assert log.Logger(tmp_path, enabled=False).progress(range(3), 3, "x").disable  # other ranks: never


def test_log_progress_takes_a_word_or_a_yaml_boolean():
    from common.config import parse_overrides, resolve
    for raw, want in (("auto", "auto"), ("true", True), ("false", False)):
        assert resolve(BASE, [(parse_overrides([f"log.progress={raw}"]), "from --set")]).log.progress == want
    with pytest.raises(UserError, match="'log.progress' = 'sometimes' is not one of: auto, true, false"):
        resolve(BASE, [(parse_overrides(["log.progress=sometimes"]), "from --set")])
    with pytest.raises(UserError, match="'out_dir' expects str"):  # booleans only where a key says so
        resolve(BASE, [(parse_overrides(["out_dir=true"]), "from --set")])


def test_logger_print_flushes_each_line(tmp_path, monkeypatch):
    class Stdout:
        def __init__(self):
            self.text, self.flushed = "", ""

        def write(self, s):
            self.text += s

        def flush(self):
            self.flushed = self.text
    out = Stdout()
    monkeypatch.setattr("sys.stdout", out)
    log.Logger(tmp_path).print("epoch 1 step 4 knn200", 31.5)
    assert out.flushed == "epoch 1 step 4 knn200 31.5\n"


class _FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (the tensorboard package is optional)."""
    made = []

    def __init__(self, logdir, purge_step=None):
        self.logdir, self.purge_step, self.scalars, self.flushes = logdir, purge_step, [], 0
        _FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1


def test_tensorboard_gets_the_metrics_lines_scalars(tmp_path, monkeypatch):
    import types
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=_FakeWriter))
    _FakeWriter.made.clear()
    lg = log.Logger(tmp_path)
    lg.config(_log_cfg(tensorboard=True))
    lg.log({"step": 10, "epoch": 0, "loss": torch.tensor(0.5), "lr": 0.1})
    lg.log({"step": 20, "epoch": 1, "knn200": 41.25, "linear_protocol": "fast (offline)"})
    (w,) = _FakeWriter.made
    assert w.logdir == str(tmp_path / "tensorboard") and w.purge_step is None and w.flushes == 2
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert w.scalars == [(k, v, rec["step"]) for rec in lines for k, v in rec.items()
                         if k != "step" and not isinstance(v, str)]
    lg = log.Logger(tmp_path, resume_step=10)  # resumed at step 10: TensorBoard hides the events after it
    lg.config(_log_cfg(tensorboard=True))
    assert _FakeWriter.made[-1].purge_step == 11
    log.Logger(tmp_path, enabled=False).config(_log_cfg(tensorboard=True))  # other ranks: no writer
    assert len(_FakeWriter.made) == 2


def test_tensorboard_not_installed_is_one_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # import fails
    lg = log.Logger(tmp_path)
    lg.config(_log_cfg(tensorboard=True))
    lg.log({"step": 1, "loss": 0.5})
    out = capsys.readouterr().out.splitlines()
    assert [x for x in out if x.startswith("log.tensorboard")] == [
        "log.tensorboard: the tensorboard package is not installed (pip install tensorboard); the run goes on, "
        "its metrics in metrics.jsonl only"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}


def test_a_fresh_run_moves_an_earlier_runs_config_aside_too(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("optim: {lr: 9.0}\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    lg = log.Logger(tmp_path)
    lg.config(Cfg.wrap({**BASE, "name": "r"}))
    old = list(tmp_path.glob("config.*.yaml"))
    assert len(old) == 1 and old[0].read_text() == "optim: {lr: 9.0}\n"
    assert f"config.yaml of an earlier run (no checkpoint) moved to {old[0]}" in capsys.readouterr().out
    assert "lr: 9.0" not in (tmp_path / "config.yaml").read_text()


# ---------------------------------------------------------------------- issue #24, second round
def _disk_full_inside_torch_save(obj, f, *a, **k):
    """What torch.save does on a full disk: its zip writer's OSError (ENOSPC) turns into a RuntimeError."""
    try:
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    except OSError:
        # implicit chaining, as torch's own: the OSError is the RuntimeError's __context__, not its __cause__
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 11177280 vs 11177176")  # noqa: B904


def test_a_full_disk_during_torch_save_is_one_line_naming_the_file_and_the_cause(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(checkpoint.snapshot(Cfg.wrap(BASE), {"step": 1}, "m"), path)
    monkeypatch.setattr(torch, "save", _disk_full_inside_torch_save)
    with pytest.raises(UserError) as e:
        checkpoint.save(checkpoint.snapshot(Cfg.wrap(BASE), {"step": 2}, "m"), path)
    msg = str(e.value)
    assert str(path.resolve()) in msg and "the disk is full" in msg and "the previous one is intact" in msg
    assert "free some space" in msg and "\n" not in msg
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"] and checkpoint.load(path)["counters"]["step"] == 1


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_a_real_full_device_is_one_line(tmp_path, monkeypatch):
    """The temporary file opened on /dev/full: the kernel's ENOSPC through torch.save's real zip writer."""
    import builtins
    path = tmp_path / "last.pt"
    checkpoint.save(checkpoint.snapshot(Cfg.wrap(BASE), {"step": 1}, "m"), path)
    monkeypatch.setattr(checkpoint, "open", lambda p, mode: builtins.open("/dev/full", mode), raising=False)
    state = {**checkpoint.snapshot(Cfg.wrap(BASE), {"step": 2}, "m"), "w": torch.zeros(1 << 20)}  # > any buffer
    with pytest.raises(UserError, match=r"last.pt \(No space left on device: the disk is full\); the previous one"):
        checkpoint.save(state, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["counters"]["step"] == 1


@pytest.mark.parametrize("err, says, fix", [
    (28, "No space left on device: the disk is full", "free some space"),
    (122, "the disk is full", "free some space"),  # EDQUOT
    (13, "Permission denied: the folder is not writable", "make it writable or set out_dir="),
    (30, "the folder is not writable", "make it writable"),  # EROFS
])
def test_no_space_and_no_permission_get_their_own_fix(tmp_path, monkeypatch, err, says, fix):
    def fail(obj, f, *a, **k):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(UserError) as e:
        checkpoint.save({}, tmp_path / "last.pt")
    assert says in str(e.value) and fix in str(e.value)
    if err in (13, 30):
        assert "free some space" not in str(e.value)
    with pytest.raises(UserError) as e:
        checkpoint.save({}, tmp_path / "backbone.pt", hint="choose another --out")
    assert str(e.value).endswith("nothing was written: choose another --out") and "out_dir" not in str(e.value)


def test_load_takes_the_callers_hint(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match="set resume="):
        checkpoint.load(bad)
    with pytest.raises(UserError) as e:
        checkpoint.load(bad, hint="pass a checkpoint of one of the six scripts")
    assert "pass a checkpoint of one of the six scripts" in str(e.value) and "resume=" not in str(e.value)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    (tmp_path / f".last.pt.tmp{dead}").write_bytes(b"x" * 100)
    (tmp_path / f".epoch_0002.pt.tmp{dead}").write_bytes(b"x")
    (tmp_path / f".last.pt.tmp{os.getpid()}").write_bytes(b"x")  # a live writer's: kept
    (tmp_path / "last.pt").write_bytes(b"x")
    assert checkpoint.remove_stale_temporaries(tmp_path) == [f".epoch_0002.pt.tmp{dead}", f".last.pt.tmp{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".last.pt.tmp{os.getpid()}", "last.pt"]


def test_a_read_only_folder_is_one_line_though_removing_the_temporary_fails_too(tmp_path, monkeypatch):
    """On a read-only filesystem unlink raises EROFS even for a file that was never created."""
    import pathlib

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(torch, "save", read_only)
    monkeypatch.setattr(pathlib.Path, "unlink", read_only)
    with pytest.raises(UserError) as e:
        checkpoint.save({}, tmp_path / "last.pt")
    assert "Read-only file system: the folder is not writable" in str(e.value) and "make it writable" in str(e.value)
