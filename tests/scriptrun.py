"""Running a method script as a user does (a subprocess, no stdin) and reading its run folder; shared by the
tests/test_<method>_run.py files, with the checks every script must pass in the same way (one clear error
line, 1 vs 2 processes, exact resume)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# views that are the (un-augmented) images: the same global batch whatever the process count
FIXED_VIEWS = ["augment.crop_scale=[1,1]", "augment.crop_ratio=[1,1]", "augment.flip_p=0", "augment.jitter_p=0",
               "augment.gray_p=0", "augment.blur_p=[0]", "augment.solarize_p=[0]"]


def one_clear_line(p):
    """A run stopped by bad input: exit status 2 and exactly one line ``error: ...`` on stderr, no traceback."""
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and len(err) == 1 and err[0].startswith("error: "), p.stderr[-2000:]
    return err[0]


def config_error(method, *overrides, config=None):
    """The one line (``error: ...``, exit 2) of a bad config, from the script's own ``parse`` in this process:
    what ``python <method>.py --config ... --set <overrides>`` prints before importing any data or model."""
    import importlib
    from contextlib import redirect_stderr
    from io import StringIO

    from common.config import parse
    mod, err = importlib.import_module(method), StringIO()
    config = config or ROOT / "configs" / "quickstart" / f"{method}.yaml"
    try:
        with redirect_stderr(err):
            parse(["--config", str(config), "--set", *overrides], mod.DEFAULTS, getattr(mod, "CHOICES", None), method)
    except SystemExit as e:
        assert e.code == 2
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]
    raise AssertionError(f"{overrides} was accepted")


class Script:
    """``python <method>.py --config <config> --set out_dir=... name=... <tiny> <overrides>`` and its outputs."""

    def __init__(self, method, tiny, config=None, extra=(), timeout=600):
        self.method, self.tiny, self.extra, self.timeout = method, list(tiny), list(extra), timeout
        self.config = config or ROOT / "configs" / "quickstart" / f"{method}.yaml"

    def run(self, tmp_path, *overrides, name="r", check=True, config=None, tiny=True, timeout=None, threads="1"):
        cmd = [sys.executable, str(ROOT / f"{self.method}.py"), "--config", str(config or self.config), "--set",
               f"out_dir={tmp_path}", f"name={name}", *self.extra, *(self.tiny if tiny else []), *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout or self.timeout, env=env,
                           stdin=subprocess.DEVNULL)
        if check:
            assert p.returncode == 0, p.stderr[-3000:]
        return p

    def folder(self, tmp_path, name):
        return tmp_path / self.method / name

    def metrics(self, tmp_path, name):
        return [json.loads(x) for x in (self.folder(tmp_path, name) / "metrics.jsonl").read_text().splitlines()]

    def steps(self, tmp_path, name):
        """The per-step records (those with a loss) of metrics.jsonl."""
        return [m for m in self.metrics(tmp_path, name) if "loss" in m]

    def summary(self, tmp_path, name):
        return json.loads((self.folder(tmp_path, name) / "summary.json").read_text())

    def checkpoint(self, tmp_path, name):
        return torch.load(self.folder(tmp_path, name) / "checkpoints" / "last.pt", weights_only=True)

    def assert_two_processes_equal_one(self, tmp_path, *overrides, keys=("loss",), atol=1e-6, rtol=1e-4,
                                       update_rtol=0.1):
        """The first step of the same run with 1 and with 2 processes (``dist.nproc``): the same weights and global
        batch, only the order of the sums differs (the processes' SyncBN statistics and gathered terms, DDP's
        averaged gradient). The logged ``keys`` and the tensors that the step's update leaves alone (BN running
        statistics) agree to float32 round-off (``rtol``, ``atol``; measured: to the log's 6 decimals on 5 kernel
        sets of x86 CPUs). Every updated tensor's change from the initial weights (a run at lr 0) agrees to
        ``update_rtol`` of its l2 norm, or to 1e-6 per element where the update is round-off itself (a bias before
        BN): the gradient of these width-8 nets at init is ill-conditioned (layer4's BN sees 2 x 2 pixels an
        image), so round-off put the updates of 1 and 2 processes up to 3% apart (RAFT's layer4, on a kernel set
        without vector units; 1.5e-3 at most on 4 others), where a run without SyncBN puts them 120-340% apart.
        Later steps are not compared: training amplifies round-off (after 3 steps the weights of 4 scripts were
        2-4x further apart than the tolerances this check held them to there, on the kernel set without vector
        units). Returns both checkpoints (one, two)."""
        more = [*overrides, "checkpoint.stop_after_step=1"]
        self.run(tmp_path, *more, "optim.lr=0", name="init")
        self.run(tmp_path, *more, name="one")
        self.run(tmp_path, *more, "dist.nproc=2", name="two")
        one = [[m[k] for k in keys] for m in self.steps(tmp_path, "one")]
        two = [[m[k] for k in keys] for m in self.steps(tmp_path, "two")]
        assert len(one) == len(two) == 1
        torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=rtol, atol=atol)
        a, b = self.checkpoint(tmp_path, "one"), self.checkpoint(tmp_path, "two")
        w0, one, two = self.checkpoint(tmp_path, "init")["online"], a["online"], b["online"]
        for k, v in one.items():
            if not v.is_floating_point():  # BN's batch counters
                assert torch.equal(two[k], v), k
            elif torch.equal(v, w0[k]):  # BN's running statistics, weights the step left alone
                torch.testing.assert_close(two[k], v, rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
            else:
                update, other = v.double() - w0[k].double(), two[k].double() - w0[k].double()
                err = (other - update).norm().item()
                assert err <= update_rtol * update.norm().item() + 1e-6 * update.numel() ** 0.5, \
                    f"{k}: the updates of 1 and 2 processes differ by {err:.3g}, |update| {update.norm().item():.3g}"
        return a, b

    def assert_resume_exact(self, tmp_path, *overrides, parts=("online",), steps=8, cuts=(3, 4)):
        """Stopped after each step of ``cuts`` (3: mid-epoch; 4: an epoch's last step, before its evaluation and
        checkpoint) and resumed vs uninterrupted: bit-equal tensors of every part in ``parts`` and the same
        metrics.jsonl (steps and evaluations). Returns both checkpoints (uninterrupted, last resumed)."""
        self.run(tmp_path, *overrides, name="full")
        a = self.checkpoint(tmp_path, "full")
        for cut in cuts:
            name = f"cut{cut}"
            self.run(tmp_path, *overrides, f"checkpoint.stop_after_step={cut}", name=name)
            assert self.checkpoint(tmp_path, name)["counters"]["step"] == cut
            self.run(tmp_path, *overrides, "resume=auto", name=name)
            b = self.checkpoint(tmp_path, name)
            assert a["counters"]["step"] == b["counters"]["step"] == steps
            for part in parts:
                for k, v in a[part].items():
                    same = torch.equal(v, b[part][k]) if torch.is_tensor(v) else v == b[part][k]
                    assert same, f"{part}.{k} differs after resume at step {cut}"
            assert self.metrics(tmp_path, name) == self.metrics(tmp_path, "full"), f"metrics differ (cut {cut})"
        return a, b
