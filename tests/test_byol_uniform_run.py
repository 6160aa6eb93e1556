"""byol_uniform.py end to end as a user runs it (subprocesses): smoke run, DDP equivalence,
exact resume, and one clear error for each kind of bad input."""
import json

import pytest

from scriptrun import FIXED_VIEWS, ROOT, Script, config_error, one_clear_line

QUICK = ROOT / "configs" / "quickstart" / "byol_uniform.yaml"
TINY = ["data.synthetic.train_size=128", "data.synthetic.test_size=64", "model.width=8", "model.proj_hidden=32",
        "model.proj_dim=16", "model.pred_hidden=32", "optim.batch_size=32", "optim.epochs=1",
        "optim.warmup_epochs=0", "eval.linear_epochs=2", "log.every=1", "eval.knn_k=[20]"]
S = Script("byol_uniform", TINY)
run, metrics, params = S.run, S.metrics, S.checkpoint


def test_smoke_run_writes_every_output(tmp_path):
    run(tmp_path)
    d = tmp_path / "byol_uniform" / "r"
    for f in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "summary.json"):
        assert (d / f).is_file(), f
    s = json.loads((d / "summary.json").read_text())
    for k in ("knn20", "knn_init", "linear_top1", "alignment", "uniformity", "wall_time_s", "images_per_s"):
        assert k in s, k
    steps = [m for m in metrics(tmp_path, "r") if "loss" in m]
    assert len(steps) == 4 and all(m["loss_uni"] < 0 for m in steps)  # 128 / 32 = 4 steps, Eq. 3 is a log-mean


@pytest.mark.slow  # default suite under 10 minutes on 2 cores; CI runs it (.ci/run)
def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    """Same global batch (fixed views), the first step with 1 and with 2 processes: Gloo SyncBN and the
    global-batch uniformity (the tolerances: ``Script.assert_two_processes_equal_one``)."""
    S.assert_two_processes_equal_one(tmp_path, *FIXED_VIEWS, "optim.lr=0.1")


@pytest.mark.slow  # default suite under 10 minutes on 2 cores; CI runs it (.ci/run)
@pytest.mark.parametrize("nproc", [1, 2])  # four other scripts' exact resume run in the default suite
def test_exact_resume_equals_uninterrupted_run(tmp_path, nproc):
    """Bit-exact, also with 2 processes, where only rank 0 writes the checkpoint (augmentations included)."""
    more = ["optim.epochs=2", "eval.linear=none", f"dist.nproc={nproc}"]
    S.assert_resume_exact(tmp_path, *more, parts=("online", "target"))  # stopped mid-epoch 0 (4 steps/epoch)


@pytest.mark.slow  # each message is a default test's too (test_config, test_data, test_checkpoint_log); here end to end
def test_bad_inputs_stop_with_one_clear_line(tmp_path):
    line = one_clear_line(run(tmp_path, "optim.lrr=0.1", check=False))  # as a user meets it, once
    assert "optim.lrr" in line and "Valid keys under 'optim'" in line
    line = config_error("byol_uniform", "optim.epochs=many")
    assert "'optim.epochs' expects int" in line
    line = one_clear_line(run(tmp_path, "data.name=cifar10", f"data.root={tmp_path / 'nodata'}", check=False))
    assert str(tmp_path / "nodata") in line and "data.download" in line
    (tmp_path / "blocker").write_text("a file, not a folder")
    line = one_clear_line(run(tmp_path, f"out_dir={tmp_path / 'blocker' / 'runs'}", check=False))
    assert "cannot write the run folder" in line


def test_corrupt_checkpoint_stops_and_is_left_alone(tmp_path):
    ck = tmp_path / "byol_uniform" / "c" / "checkpoints" / "last.pt"
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b"\x00garbage")
    line = one_clear_line(run(tmp_path, "resume=auto", name="c", check=False))
    assert "corrupt" in line and str(ck) in line
    assert ck.read_bytes() == b"\x00garbage"
