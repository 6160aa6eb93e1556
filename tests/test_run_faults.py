"""Faults met on a cluster (issue: runs survive, second round), on byol_uniform.py and raft.py run as subprocesses:
a signal during the final evaluation (the kNN, the linear probe), a resume on another number of processes, an
unwritable metrics.jsonl, a stopped seed of a multi-seed RAFT run, progress lines in a log file. A fault is injected
by a small wrapper that patches one function of ``common`` and then runs the script as ``__main__``."""
import json
import os
import re
import subprocess
import sys

import pytest

from scriptrun import ROOT, Script, one_clear_line

TINY = ["data.synthetic.train_size=128", "data.synthetic.test_size=64", "model.width=8", "model.proj_hidden=32",
        "model.proj_dim=16", "model.pred_hidden=32", "optim.batch_size=32", "optim.epochs=1",
        "optim.warmup_epochs=0", "eval.linear=fast", "eval.linear_epochs=3", "log.every=1", "eval.knn_k=[20]",
        "log.progress=false"]
S = Script("byol_uniform", TINY)
WRAPPER = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
import {module} as m
real, calls = m.{name}, [0]
def patched(*a, **k):
    calls[0] += 1
    if calls[0] == {at}:
        {fault}
    return real(*a, **k)
m.{name} = patched
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""
SIGNAL = "os.kill(os.getpid(), signal.SIGUSR1)"


def run_with(tmp_path, module, name, at, fault, *overrides, run="r", env=None, script="byol_uniform"):
    """``script`` with ``module.name``'s ``at``-th call doing ``fault`` first."""
    wrapper = tmp_path / f"wrap_{name}_{at}.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), module=module, name=name, at=at, fault=fault,
                                      script=str(ROOT / f"{script}.py")))
    cmd = [sys.executable, str(wrapper), "--config", str(ROOT / "configs" / "quickstart" / f"{script}.yaml"), "--set",
           f"out_dir={tmp_path}", f"name={run}", *TINY, *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def fake_scontrol(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}


def without_times(s):
    return {k: v for k, v in s.items() if not k.endswith(("_s", "time_s"))}


@pytest.mark.slow  # default suite under 10 minutes on 2 cores; CI runs it (.ci/run)
def test_a_signal_during_the_final_knn_or_probe_stops_requeues_and_resume_evaluates_again(tmp_path):
    """SIGUSR1 while the final evaluation extracts the kNN bank (the 3rd feature extraction: after the
    random-init kNN's two), and while the linear probe trains: exit 3, one line, `scontrol requeue`; resume=auto
    then evaluates again and ends with the uninterrupted run's summary."""
    S.run(tmp_path, "requeue=true", name="full")
    full = without_times(S.summary(tmp_path, "full"))
    for name, at, run in (("extract_features", 3, "knn"), ("linear_probe", 1, "probe")):
        env = fake_scontrol(tmp_path)
        p = run_with(tmp_path, "common.evaluate", name, at, SIGNAL, "requeue=true", run=run, env=env)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 3 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert lines[0].startswith("stopped by SIGUSR1 after step 4") and "SLURM job 4242 requeued" in lines[0]
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
        (tmp_path / "scontrol.args").unlink()
        assert not (S.folder(tmp_path, run) / "summary.json").exists()
        assert S.checkpoint(tmp_path, run)["counters"]["eval_pending"] == (run == "knn")
        S.run(tmp_path, "requeue=true", "resume=auto", name=run)
        assert without_times(S.summary(tmp_path, run)) == full, run
        evals = [m for m in S.metrics(tmp_path, run) if "knn20" in m]
        assert [m["step"] for m in evals] == [4]  # the final evaluation, logged once


@pytest.mark.slow  # default suite under 10 minutes on 2 cores; CI runs it (.ci/run)
def test_a_resume_on_another_number_of_processes_is_refused_or_recorded(tmp_path):
    S.run(tmp_path, "optim.epochs=2", "checkpoint.stop_after_step=3", name="w")
    assert S.checkpoint(tmp_path, "w")["counters"]["world_size"] == 1
    line = one_clear_line(S.run(tmp_path, "optim.epochs=2", "resume=auto", "dist.nproc=2", name="w", check=False))
    assert "written by 1 processes, this run has 2" in line and "resume_allow_changes=true" in line
    p = S.run(tmp_path, "optim.epochs=2", "resume=auto", "dist.nproc=2", "resume_allow_changes=true", name="w")
    assert "note: resuming a run of 1 processes on 2" in p.stdout
    assert S.summary(tmp_path, "w")["config_changes"] == [{"step": 3, "processes": [1, 2]}]


def test_an_unwritable_metrics_file_is_one_line_and_the_step_reached_is_kept(tmp_path):
    """metrics.jsonl cannot be written at step 3 (as after `chmod a-w`, which root ignores: injected): exit 2, one
    line naming the file, last.pt at step 3; made writable again, resume=auto finishes the run."""
    fault = "raise PermissionError(13, 'Permission denied')"
    # Logger.log's calls: the random-init kNN line (1), steps 1, 2 (2, 3), step 3 (4)
    p = run_with(tmp_path, "common.log", "Logger.log", 4, fault, "optim.epochs=2", run="ro")
    line = one_clear_line(p)
    assert "metrics.jsonl (Permission denied)" in line and "last.pt holds step 3" in line
    assert S.checkpoint(tmp_path, "ro")["counters"]["step"] == 3
    S.run(tmp_path, "optim.epochs=2", "resume=auto", name="ro")
    assert S.summary(tmp_path, "ro")["steps"] == 8
    # the record of step 3, which could not be written, was kept in last.pt and written first on resume
    assert [m["step"] for m in S.metrics(tmp_path, "ro") if "loss" in m] == list(range(1, 9))


def without_root_override():
    """A command prefix under which root obeys file permissions (``setpriv`` drops CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH); [] when not root; None when that cannot be done here."""
    if os.geteuid() != 0:
        return []
    cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
           "-dac_override,-dac_read_search"]
    try:
        ok = subprocess.run([*cmd, "true"], capture_output=True).returncode == 0
    except OSError:
        ok = False
    return cmd if ok else None


def test_a_read_only_metrics_file_on_resume_is_one_line_before_any_work(tmp_path):
    """`chmod a-w metrics.jsonl`, then resume=auto (as root: under setpriv, without the override of file
    permissions): exit 2, one line naming the file and the fix, before any work (no step, checkpoint unchanged)."""
    prefix = without_root_override()
    if prefix is None:
        pytest.skip("running as root and setpriv cannot drop CAP_DAC_OVERRIDE here: root would write the file")
    S.run(tmp_path, "checkpoint.stop_after_step=2", name="ro")
    metrics = S.folder(tmp_path, "ro") / "metrics.jsonl"
    before = metrics.read_text()
    metrics.chmod(0o444)
    cmd = [*prefix, sys.executable, str(ROOT / "byol_uniform.py"), "--config", str(S.config), "--set",
           f"out_dir={tmp_path}", "name=ro", *TINY, "resume=auto"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = one_clear_line(p)
    assert f"cannot write {metrics.resolve()} (Permission denied)" in line and "chmod u+w" in line, line
    assert "resuming" not in p.stdout and not re.search(r"^step ", p.stdout, re.MULTILINE), p.stdout
    assert metrics.read_text() == before and S.checkpoint(tmp_path, "ro")["counters"]["step"] == 2
    metrics.chmod(0o644)
    S.run(tmp_path, "resume=auto", name="ro")
    assert S.summary(tmp_path, "ro")["steps"] == 4


def test_raft_seeds_a_stopped_seed_ends_the_command_and_resume_continues_it(tmp_path):
    raft = Script("raft", [*TINY, "eval.linear=none"])
    p = raft.run(tmp_path, "seeds=[3,4]", "checkpoint.stop_after_step=2", name="s")
    assert "Traceback" not in p.stderr and "stopped after step 2" in p.stdout
    assert not (tmp_path / "raft" / "s" / "seed4").exists() and not (tmp_path / "raft" / "s" / "summary.json").exists()
    raft.run(tmp_path, "seeds=[3,4]", "resume=auto", name="s")
    agg = raft.summary(tmp_path, "s")
    assert agg["seeds"] == [3, 4] and raft.summary(tmp_path, "s/seed3")["steps"] == 4


def test_a_log_file_gets_plain_progress_lines_and_no_bars(tmp_path):
    """stdout into a file (not a terminal): a plain line at the first logging step (then at most every 30 s),
    no carriage returns; log.progress=false: none."""
    p = S.run(tmp_path, "log.progress=true", name="p")
    plain = [x for x in p.stdout.splitlines() if x.startswith("step ")]
    m = plain and re.fullmatch(r"step 1/4 epoch 0 loss \S+ proj_std (\S+) \S+ img/s ETA \d\d:\d\d:\d\d", plain[0])
    assert m and 0 < float(m[1]) < 1, p.stdout  # the collapse signal (about 1/sqrt(16) = 0.25 here)
    assert "\r" not in p.stdout + p.stderr
    q = S.run(tmp_path, "log.progress=false", name="q")
    assert not [x for x in q.stdout.splitlines() if x.startswith("step ")]
    json.loads((S.folder(tmp_path, "q") / "summary.json").read_text())


CLOCK = """
import itertools, runpy, sys, time
sys.path.insert(0, {root!r})
import common.log as L
class Clock:  # common/log.py's clock: each reading 31 s after the last (time.* otherwise)
    ticks = itertools.count(0, 31)
    def __getattr__(self, name):
        return getattr(time, name)
    def time(self):
        return float(next(self.ticks))
L.time = Clock()
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_a_log_file_gets_a_progress_line_when_30_s_pass_between_log_steps(tmp_path):
    """A clock that moves 31 s per reading (slow steps), log.every=3: a line at every step, not only at the log
    steps 3 and 4, each with that step's loss; metrics.jsonl still has the log steps only."""
    wrapper = tmp_path / "clock.py"
    wrapper.write_text(CLOCK.format(root=str(ROOT), script=str(ROOT / "byol_uniform.py")))
    cmd = [sys.executable, str(wrapper), "--config", str(S.config), "--set", f"out_dir={tmp_path}", "name=c",
           *TINY, "log.every=3", "log.progress=true"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    plain = [re.fullmatch(r"step (\d)/4 epoch 0 loss (\S+) proj_std (\S+) \S+ img/s ETA \S+", x)
             for x in p.stdout.splitlines() if x.startswith("step ")]
    assert all(plain) and [int(m[1]) for m in plain] == [1, 2, 3, 4], p.stdout
    assert all(float(m[2]) == float(m[2]) and 0 < float(m[3]) < 1 for m in plain)
    assert [m["step"] for m in S.metrics(tmp_path, "c") if "loss" in m] == [3, 4]
