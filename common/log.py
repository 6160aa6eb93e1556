"""Run folder, metrics and progress (writes happen on rank 0 only).

``runs/<method>/<name>/`` holds ``config.yaml`` (the resolved config),
``metrics.jsonl`` (one JSON object per logging step and per evaluation),
``checkpoints/`` and, at the end, ``summary.json``. On resume the metric lines
past the checkpoint's step are dropped (and a torn last line), so a resumed
run's file reads like an uninterrupted one; a fresh run in a folder that holds
an earlier run's ``metrics.jsonl`` / ``summary.json`` / ``config.yaml`` (but no checkpoint) moves
them aside first (``metrics.<time>.jsonl``, ``config.<time>.yaml``) and says so.

The run's ``log`` settings take effect at ``Logger.config(cfg)``:

- ``log.progress``: ``auto`` and ``true`` show a tqdm bar of each epoch on a terminal (stderr) and, when stdout
  is not a terminal (a SLURM log), print a plain line at the first step, then when ``PLAIN_EVERY_S`` seconds have
  passed (checked at every step): step, epoch, loss, the collapse signal ``proj_std`` (between logging steps: rank 0's
  own), images/s, ETA; ``false`` shows neither.
- ``log.tensorboard: true``: every metrics line is also written as TensorBoard scalars (the same keys,
  against ``step``) to ``run_dir/tensorboard/``, through ``torch.utils.tensorboard``. It needs the
  ``tensorboard`` package, which is optional (``pip install tensorboard``): without it the run prints one
  line saying so and goes on, its metrics in ``metrics.jsonl`` as always.

Every printed line is flushed at once, so a SLURM log shows each evaluation when it happens.
"""
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from common import config as config_lib
from common.config import UserError

PLAIN_EVERY_S = 30  # seconds between plain progress lines in a log file


def mean_std(values):
    """Mean and sample standard deviation (n - 1) of the finite numbers in ``values``: the one rule of every
    mean ± std over seeds (the results table, RAFT's seeds, the toy runs, the figures' bands); (None, None)
    without a number, std 0 for one."""
    v = [x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def _records(path):
    """The JSON lines of ``path`` (a torn line, e.g. from a kill during a write, is skipped)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            pass
    return out


def run_dir(cfg, method):
    """Create (and check we can write) ``out_dir/method/name``."""
    path = Path(cfg.out_dir) / method / cfg.name
    try:
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the run folder {path.resolve()} ({e.strerror or e}): "
                        "set out_dir=... to a writable folder") from None
    return path


def tensorboard_writer(folder, purge_step=None):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``folder``, or None when tensorboard is not installed.
    ``purge_step``: on resume, events at or after that step (written after the checkpoint) are dropped."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard needs the tensorboard package
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


class Logger:
    def __init__(self, path, enabled=True, resume_step=None):
        self.path, self.enabled, self.resume_step = Path(path), enabled, resume_step
        self.metrics = self.path / "metrics.jsonl"
        self.start = time.time()
        self.show_progress, self.tensorboard = "auto", None  # log.progress, log.tensorboard (set by config())
        self._line = 0.0  # when the last plain progress line was printed
        if enabled and resume_step is not None and self.metrics.exists():
            keep = [line for line, rec in _records(self.metrics) if rec.get("step", 0) <= resume_step]
            self.metrics.write_text("".join(line + "\n" for line in keep))
        elif enabled and resume_step is None:  # a fresh run: an earlier run's records are kept aside
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for f in (self.metrics, self.path / "summary.json", self.path / "config.yaml"):
                if f.exists():
                    old = f.with_name(f"{f.stem}.{stamp}{f.suffix}")
                    f.rename(old)
                    self.print(f"note: {f.name} of an earlier run (no checkpoint) moved to {old}")

    def print(self, *msg):
        if self.enabled:
            tqdm.write(" ".join(str(m) for m in msg), file=sys.stdout)
            sys.stdout.flush()

    def config(self, cfg, keep_old=None):
        """Save and print the resolved config (``keep_old``: first rename the existing config.yaml to that
        name), and take its ``log`` settings (progress bar, TensorBoard)."""
        log_cfg = cfg.get("log", {})
        self.show_progress = log_cfg.get("progress", "auto")
        if self.enabled:
            if keep_old and (self.path / "config.yaml").exists():
                (self.path / "config.yaml").rename(self.path / keep_old)
            config_lib.save(cfg, self.path / "config.yaml")
            self.print(config_lib.dump(cfg))
        if self.enabled and log_cfg.get("tensorboard", False) and self.tensorboard is None:
            purge = self.resume_step + 1 if self.resume_step is not None else None
            self.tensorboard = tensorboard_writer(self.path / "tensorboard", purge)
            if self.tensorboard is None:
                self.print("log.tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                           "the run goes on, its metrics in metrics.jsonl only")

    def log(self, record):
        """Append one metrics line (numbers rounded for reading; step/epoch kept exact)."""
        if self.enabled:
            rec = {k: (round(float(v), 6) if hasattr(v, "__float__") and not isinstance(v, int) else v)
                   for k, v in record.items()}
            with open(self.metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.tensorboard is not None:  # the same numbers, against the step
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.tensorboard.add_scalar(k, v, rec.get("step", 0))
                self.tensorboard.flush()

    def summary(self, record):
        if self.enabled:
            record = {"wall_time_s": round(time.time() - self.start, 2), **record}
            tmp = self.path / ".summary.json.tmp"
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, self.path / "summary.json")
            self.print("summary:", json.dumps(record))

    def progress(self, iterable, total, desc):
        """``iterable`` with a tqdm bar on rank 0 when ``log.progress`` allows and stderr is a terminal (into a file
        a bar's carriage returns would glue the lines together: ``progress_line`` prints plain lines there)."""
        show = self.enabled and self.show_progress is not False and sys.stderr.isatty()
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not show)

    def line_due(self):
        """Is a plain progress line due: stdout not a terminal (a SLURM log), ``PLAIN_EVERY_S`` s since the last
        (asked at every step, so the gap does not depend on the step time)?"""
        return (self.enabled and self.show_progress is not False and not sys.stdout.isatty()
                and time.time() - self._line >= PLAIN_EVERY_S)

    def progress_line(self, step, total, epoch, loss, images, train_s, proj_std=None):
        """A plain progress line when ``line_due`` (``proj_std``: the collapse signal, ``common.run``, when given)."""
        if not self.line_due():
            return
        self._line = time.time()
        eta = time.strftime("%H:%M:%S", time.gmtime(train_s / max(step, 1) * (total - step)))
        signal = f" proj_std {proj_std:.3g}" if proj_std is not None else ""
        self.print(f"step {step}/{total} epoch {epoch} loss {loss:.4g}{signal} {images / max(train_s, 1e-9):.1f} "
                   f"img/s ETA {eta}")
