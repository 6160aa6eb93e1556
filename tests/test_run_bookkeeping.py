"""The run's bookkeeping (common/run.py), as a cluster user and a careless user meet it, on byol_uniform.py run as a
subprocess: preemption signals (1 and 2 processes) and SLURM requeue, runs that diverge, two runs in one folder,
fresh runs in an old folder, resuming finished or changed runs, another method's checkpoint, a dead or stalled rank,
bad values and small faults. Every stop resumes exactly (torch.equal with the uninterrupted run) and loses no file.
The epoch-boundary stop (every script, 1 and 2 processes) is in tests/scriptrun.py's assert_resume_exact."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scriptrun import ROOT, Script, one_clear_line

TINY = ["data.synthetic.train_size=128", "data.synthetic.test_size=64", "model.width=8", "model.proj_hidden=32",
        "model.proj_dim=16", "model.pred_hidden=32", "optim.batch_size=32", "optim.epochs=1",
        "optim.warmup_epochs=0", "eval.linear=none", "log.every=1", "eval.knn_k=[20]", "log.progress=false"]
S = Script("byol_uniform", TINY)
LONG = ["optim.epochs=6", "eval.every=0"]  # 24 steps: time to send a signal mid-run


def folder(tmp_path, name):
    return S.folder(tmp_path, name)


def files(tmp_path, name):
    """Every file of a run folder and its bytes."""
    d = folder(tmp_path, name)
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def start(tmp_path, *overrides, name="r", env=None):
    cmd = [sys.executable, str(ROOT / "byol_uniform.py"), "--config", str(S.config), "--set", f"out_dir={tmp_path}",
           f"name={name}", *TINY, *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for_step(tmp_path, name, step, proc, timeout=120):
    """Block until metrics.jsonl logs ``step`` (the run is training)."""
    path, t0 = folder(tmp_path, name) / "metrics.jsonl", time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        if path.exists() and any(json.loads(x).get("step", 0) >= step and "loss" in x
                                 for x in path.read_text().splitlines() if x.strip()):
            return
        time.sleep(0.05)
    raise AssertionError("the run did not reach step %d" % step)


def assert_same_tensors(a, b, parts=("online", "target", "optimizer")):
    def flat(x, prefix=""):
        if torch.is_tensor(x):
            return {prefix: x}
        if isinstance(x, dict):
            return {k: v for key, val in x.items() for k, v in flat(val, f"{prefix}.{key}").items()}
        return {}
    for part in parts:
        fa, fb = flat(a[part]), flat(b[part])
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), part


# ------------------------------------------------------------------------------------------ preemption
@pytest.mark.parametrize("nproc, sig", [(1, signal.SIGTERM), pytest.param(1, signal.SIGINT, marks=pytest.mark.slow),
                                        pytest.param(2, signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_checkpoints_the_step_reached_and_resumes_exactly(tmp_path, nproc, sig):
    """SIGTERM / Ctrl-C (SIGINT): every rank finishes its step, last.pt is written at that step, one line, exit 3;
    resume=auto then ends equal to the uninterrupted run. With 2 processes the signal goes to the launcher."""
    more = [*LONG, f"dist.nproc={nproc}"]
    p = start(tmp_path, *more, name="cut")
    wait_for_step(tmp_path, "cut", 3, p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 3, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {'SIGTERM' if nproc > 1 else sig.name} after step"), err
    step = int(lines[0].split("after step ")[1].split(":")[0])
    assert 3 <= step < 24 and S.checkpoint(tmp_path, "cut")["counters"]["step"] == step
    S.run(tmp_path, *more, "resume=auto", name="cut")
    S.run(tmp_path, *more, name="full")
    assert_same_tensors(S.checkpoint(tmp_path, "full"), S.checkpoint(tmp_path, "cut"))
    assert S.steps(tmp_path, "cut") == S.steps(tmp_path, "full")


def test_sigusr1_under_slurm_requeues_the_job_when_asked(tmp_path):
    """sbatch --signal=USR1@120 and requeue=true: checkpoint, then `scontrol requeue $SLURM_JOB_ID` (a stand-in
    scontrol on PATH records its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    p = start(tmp_path, *LONG, "requeue=true", name="q", env=env)
    wait_for_step(tmp_path, "q", 2, p)
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3 and "SLURM job 4242 requeued" in err, err
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]


# ------------------------------------------------------------------------------------------ divergence
def test_a_diverged_run_never_writes_non_finite_weights_and_names_the_last_good_checkpoint(tmp_path):
    """lr 1e30: the first step's weights are finite, the second's are not. A step checkpoint due every step is
    written at step 1 and refused from step 2 on; the message names that checkpoint. Without step checkpoints the
    run stops before its first (epoch) checkpoint and says there is none."""
    line = one_clear_line(S.run(tmp_path, "optim.lr=1e30", "checkpoint.every_steps=1", "log.every=4", name="d",
                                check=False))
    ck = folder(tmp_path, "d") / "checkpoints" / "last.pt"
    state = torch.load(ck, weights_only=True)
    step = state["counters"]["step"]
    assert f"the last good checkpoint is {ck} (step {step})" in line and "training diverged" in line
    assert "resume=auto resume_allow_changes=true" in line  # a lower lr is refused without it
    assert all(v.isfinite().all() for part in ("online", "target") for v in state[part].values()
               if v.is_floating_point())
    line = one_clear_line(S.run(tmp_path, "optim.lr=1e30", name="d0", check=False))
    assert "training diverged; no checkpoint was written before" in line
    assert not (folder(tmp_path, "d0") / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_two_ranks_agree_on_divergence_one_line_exit_2(tmp_path):
    S.run(tmp_path, "dist.nproc=2", name="d2")  # a good epoch: last.pt at step 4
    ck = folder(tmp_path, "d2") / "checkpoints" / "last.pt"
    good = ck.read_bytes()
    line = one_clear_line(S.run(tmp_path, "dist.nproc=2", "resume=auto", "optim.epochs=3", "optim.lr=1e30",
                                "resume_allow_changes=true", name="d2", check=False))
    assert f"the last good checkpoint is {ck} (step 4)" in line and ck.read_bytes() == good


# ------------------------------------------------------------------------------------------ one folder, two runs
def test_a_second_run_in_a_busy_folder_is_refused_and_a_dead_runs_lock_taken_over(tmp_path):
    p = start(tmp_path, "data.synthetic.train_size=4096", "eval.every=0", name="busy")  # killed in its 1st epoch
    wait_for_step(tmp_path, "busy", 1, p)
    line = one_clear_line(S.run(tmp_path, "resume=auto", name="busy", check=False))
    assert f"is in use by pid {p.pid}" in line and "set name=" in line
    p.kill()  # kill -9: the lock stays behind
    p.communicate()
    assert (folder(tmp_path, "busy") / ".lock").exists()
    out = S.run(tmp_path, "resume=auto", name="busy").stdout  # no checkpoint yet: a fresh run, old records aside
    assert f"took over the lock of pid {p.pid}" in out and "moved to" in out
    assert not (folder(tmp_path, "busy") / ".lock").exists()


def test_a_fresh_run_keeps_an_earlier_runs_records_aside(tmp_path):
    d = folder(tmp_path, "f")
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    out = S.run(tmp_path, name="f").stdout
    old = list(d.glob("metrics.*.jsonl"))
    assert len(old) == 1 and old[0].read_text() == '{"step": 1, "loss": 9.0}\n' and f"moved to {old[0]}" in out
    assert [m["step"] for m in S.steps(tmp_path, "f")] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ provenance
def test_resuming_a_finished_run_changes_nothing(tmp_path):
    S.run(tmp_path, name="done")
    before = files(tmp_path, "done")
    p = S.run(tmp_path, "resume=auto", name="done")
    assert "already finished" in p.stdout and files(tmp_path, "done") == before


def test_changed_settings_are_refused_or_allowed_and_recorded(tmp_path):
    S.run(tmp_path, "optim.epochs=2", "checkpoint.stop_after_step=3", name="c")
    before = files(tmp_path, "c")
    line = one_clear_line(S.run(tmp_path, "optim.epochs=2", "resume=auto", "optim.lr=0.5", "seed=1", name="c",
                                check=False))
    assert "settings that alter training (optim.lr: 2.0 -> 0.5, seed: 0 -> 1)" in line
    assert files(tmp_path, "c") == before  # config.yaml and everything else untouched
    S.run(tmp_path, "optim.epochs=2", "resume=auto", "optim.lr=0.5", "resume_allow_changes=true", name="c")
    d = folder(tmp_path, "c")
    change = {"optim.lr": [2.0, 0.5]}
    assert {"step": 3, "epoch": 0, "config_changed": change} in S.metrics(tmp_path, "c")
    assert S.summary(tmp_path, "c")["config_changes"] == [{"step": 3, **change}]
    assert "lr: 2.0" in (d / "config_until_step3.yaml").read_text() and "lr: 0.5" in (d / "config.yaml").read_text()


def test_time_and_throughput_cover_every_segment(tmp_path):
    S.run(tmp_path, "optim.epochs=2", "checkpoint.stop_after_step=3", name="t")
    S.run(tmp_path, "optim.epochs=2", "resume=auto", name="t")
    s = S.summary(tmp_path, "t")
    assert s["images_per_s"] * s["train_time_s"] == pytest.approx(8 * 32, rel=0.02)  # all 8 steps' images
    assert s["wall_time_s"] >= s["train_time_s"] > 0


def test_another_methods_checkpoint_is_refused(tmp_path):
    S.run(tmp_path, "checkpoint.stop_after_step=2", name="u")
    ck = folder(tmp_path, "u") / "checkpoints" / "last.pt"
    mhe = Script("byol_mhe", TINY)
    line = one_clear_line(mhe.run(tmp_path, f"resume={ck}", name="m", check=False))
    assert "written by byol_uniform.py, not byol_mhe.py" in line


# ------------------------------------------------------------------------------------------ dead or stalled ranks
def _other_rank(tmp_path, name, proc):
    """The pid of rank 1: the launcher's child that does not hold the lock (rank 0 does)."""
    lock_pid = json.loads((folder(tmp_path, name) / ".lock").read_text())["pid"]
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ranks = [int(c) for c in children if int(c) != lock_pid and "python" in open(f"/proc/{c}/cmdline").read()]
    return [r for r in ranks if "spawn_main" in open(f"/proc/{r}/cmdline").read()][0]


@pytest.mark.slow
def test_a_dead_rank_is_named_by_the_launcher(tmp_path):
    p = start(tmp_path, *LONG, "dist.nproc=2", name="dead")
    wait_for_step(tmp_path, "dead", 2, p)
    os.kill(_other_rank(tmp_path, "dead", p), signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "error: process 1 (rank 1) exited with code -9" in err, err


@pytest.mark.slow
def test_a_stalled_rank_times_out_instead_of_hanging(tmp_path):
    p = start(tmp_path, *LONG, "dist.nproc=2", "dist.timeout_min=0.1", name="stall")
    wait_for_step(tmp_path, "stall", 2, p)
    os.kill(_other_rank(tmp_path, "stall", p), signal.SIGSTOP)  # rank 1 stops answering
    _, err = p.communicate(timeout=120)  # rank 0's collective times out after 6 s; the stopped rank is killed
    assert p.returncode != 0 and "error: process 0 (rank 0) failed" in err, err


# ------------------------------------------------------------------------------------------ bad values, small faults
def test_a_bad_value_writes_nothing(tmp_path):
    line = one_clear_line(S.run(tmp_path, "optim.lr=-0.1", name="bad", check=False))
    assert "'optim.lr' = -0.1 is out of range" in line
    line = one_clear_line(S.run(tmp_path, "eval.knn_k=[1000]", name="bad", check=False))  # 128 images in the bank
    assert "eval.knn_k=[1000] asks for more neighbours than the 128 images" in line
    assert not (tmp_path / "byol_uniform").exists() or not any((tmp_path / "byol_uniform").iterdir())


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path):
    S.run(tmp_path, "optim.epochs=2", "checkpoint.stop_after_step=3", name="torn")
    with open(folder(tmp_path, "torn") / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "epoch": 0, "lo')  # killed while writing a line
    S.run(tmp_path, "optim.epochs=2", "resume=auto", name="torn")
    assert [m["step"] for m in S.steps(tmp_path, "torn")] == list(range(1, 9))


def test_a_failed_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from common import checkpoint
    from common.config import UserError
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1}, path)

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*the previous one is intact"):
        checkpoint.save({"step": 2}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.undo()
    assert checkpoint.read(path) == {"step": 1}  # (its digest checked and removed)


# ------------------------------------------------------------------------------------------ copying a script
def test_a_script_copied_with_common_into_an_empty_folder_runs_there(tmp_path):
    """The README's promise: one script + common/ + its config, copied into another project, run as is."""
    import shutil
    dest = tmp_path / "my_project"
    dest.mkdir()
    shutil.copy(ROOT / "msbreg.py", dest)
    shutil.copytree(ROOT / "common", dest / "common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "configs" / "quickstart" / "msbreg.yaml", dest / "msbreg.yaml")
    cmd = [sys.executable, "msbreg.py", "--config", "msbreg.yaml", "--set", "out_dir=runs", *TINY, "loss.K=2",
           "eval.knn_k=[20]", "eval.knn_majority_k=[5]"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                       env={**env, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads((dest / "runs" / "msbreg" / "msbreg" / "summary.json").read_text())
    assert s["steps"] == 4 and "knn20" in s and "knn5_majority" in s


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch):
    """After a hard kill, SLURM may requeue the job on another node: the lock of the same job id is taken over;
    another job's lock on another node is not (its process cannot be checked from here)."""
    from common.config import UserError
    from common.run import lock
    (tmp_path / ".lock").write_text(json.dumps({"pid": 4242, "host": "node-17", "slurm_job": "77"}))
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(UserError, match="in use by pid 4242 on node-17"):
        lock(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock(tmp_path)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_the_lock_file_is_not_executable(tmp_path):
    from common.run import lock, unlock
    old = os.umask(0o022)
    try:
        lock(tmp_path)
        assert (tmp_path / ".lock").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
        unlock(tmp_path)


# ------------------------------------------------------------------------------------------ a full disk
FULL_DISK_HOOK = '''
import os
if os.environ.get("TEST_DISK_FULL_AFTER"):  # every process of the run: torch.save fails as on a full disk
    import torch
    _save, _calls = torch.save, [0]

    def save(obj, f, *a, **k):
        _calls[0] += 1
        if _calls[0] <= int(os.environ["TEST_DISK_FULL_AFTER"]):
            return _save(obj, f, *a, **k)
        try:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 11177280 vs 11177176")
    torch.save = save
'''


def run_on_a_disk_that_fills(tmp_path, *overrides, name):
    """The run's first checkpoint is written, the second finds the disk full."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(FULL_DISK_HOOK)
    env = {"TEST_DISK_FULL_AFTER": "1", "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    p = start(tmp_path, "optim.epochs=2", *overrides, name=name, env=env)
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_full_disk_is_one_line_naming_the_checkpoint_and_the_last_one_survives(tmp_path, nproc):
    line = one_clear_line(run_on_a_disk_that_fills(tmp_path, f"dist.nproc={nproc}", name="full"))
    ck = folder(tmp_path, "full") / "checkpoints" / "last.pt"
    assert f"could not write the checkpoint {ck}" in line and "the disk is full" in line, line
    assert "the previous one is intact" in line and "free some space" in line
    assert torch.load(ck, weights_only=True)["counters"]["step"] == 4  # epoch 1's
    assert [p.name for p in ck.parent.iterdir()] == ["last.pt"]


@pytest.mark.skipif(not os.environ.get("TEST_SMALL_FS"), reason="set TEST_SMALL_FS to a small empty filesystem, e.g. "
                    "mount -t tmpfs -o size=15m tmpfs /tmp/small")
def test_a_real_full_filesystem(tmp_path):
    """width 16: one checkpoint (~9 MB) fits on 15 MB, a second beside it (its temporary file) does not."""
    small = os.environ["TEST_SMALL_FS"]
    name = f"full{os.getpid()}"
    try:
        p = S.run(small, "optim.epochs=2", "model.width=16", "model.proj_hidden=256", "model.pred_hidden=256",
                  name=name, check=False)
        line = one_clear_line(p)
        ck = S.folder(Path(small), name) / "checkpoints" / "last.pt"
        assert f"could not write the checkpoint {ck.resolve()}" in line and "the disk is full" in line, line
        assert torch.load(ck, weights_only=True)["counters"]["step"] == 4
    finally:
        import shutil
        shutil.rmtree(Path(small) / "byol_uniform" / name, ignore_errors=True)


def test_a_killed_writes_temporary_file_is_removed_when_the_folder_is_next_taken(tmp_path):
    S.run(tmp_path, "checkpoint.stop_after_step=2", name="k")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = folder(tmp_path, "k") / "checkpoints" / f".last.pt.tmp{dead}"  # kill -9 during a write
    stale.write_bytes(b"x" * 1000)
    out = S.run(tmp_path, "resume=auto", name="k").stdout
    assert not stale.exists() and f"removed checkpoints/{stale.name}" in out


def _save_on_a_full_disk(rank, world, folder):
    """Run.save on 2 Gloo processes, rank 0's torch.save failing as on a full disk; the barrier after the write is
    skipped, so a rank that missed the failure returns instead of waiting. Returns the error each rank raised."""
    from common import dist as cd
    from common.config import BASE, Cfg, UserError
    from common.run import Run
    if rank == 0:
        torch.save = lambda obj, f, *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    cd.barrier = lambda: None
    run = Run.__new__(Run)
    run.cfg, run.method, run.dir, run._last_saved, run._last_eval = Cfg.wrap(BASE), "m", Path(folder), None, None
    run._finite, run._t_start = torch.ones((), dtype=torch.bool), time.time()
    run.objects = {"model": torch.nn.Linear(2, 2), "scaler": torch.amp.GradScaler("cpu", enabled=False)}
    run.counters = {"step": 1, "wall_s": 0.0}
    try:
        run.save("last.pt")
    except UserError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_a_full_disk_on_rank_0_is_every_ranks_same_error(tmp_path):
    from gloo import on_processes
    (tmp_path / "checkpoints").mkdir()
    errors = on_processes(_save_on_a_full_disk, str(tmp_path))
    assert errors[0] and errors[1] == errors[0] and "the disk is full" in errors[0], errors


def test_a_per_process_batch_of_one_image_with_batchnorm_is_one_line(tmp_path):
    line = one_clear_line(S.run(tmp_path, "optim.batch_size=1", name="b1", check=False))
    assert "optim.batch_size=1 gives each of the 1 processes 1 image per step" in line
    assert "BatchNorm needs 2 or more: set optim.batch_size=2 or more" in line
    assert not folder(tmp_path, "b1").exists()  # stopped before start: no folder left behind
