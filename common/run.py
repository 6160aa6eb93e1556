"""The run's bookkeeping around a method script's training loop, written once.

A script's ``train(cfg)`` shows the method and the step as PyTorch writes it (the forward and loss under
autocast; backward, clip, optimizer step and ``zero_grad`` in the open; then the EMA) and where each step and
each epoch ends (byol_uniform.py is the shortest example); a ``Run`` does the rest::

    run = Run(cfg, METHOD); views = run.views(2); loader = run.loader(views)  # folder, resume state, data
    online = dist.sync_bn(Online(cfg.model), cfg).to(run.device, memory_format=run.memory_format)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.precision == "fp16")
    run.resume_or_evaluate_init(online.f, online=online, target=target, optimizer=opt, scaler=scaler)
    for epoch in run.epochs():                        # range(the resumed epoch, optim.epochs)
        for batch, step_due in run.batches(loader):   # the rest of this epoch; step_due: the group's last forward
            with dist.no_sync(model, unless=step_due):
                with run.autocast():
                    loss, logs = ...
                scaler.scale(loss / cfg.optim.accum_steps).backward()
            if step_due:
                set_lr(...); clip; scaler.step(opt); scaler.update(); opt.zero_grad(set_to_none=True); ema.update(...)
                run.step_done(loss, logs, lr=lr)     # count, log, NaN guard, collapse signal
                if run.stop_requested():
                    run.save_and_exit()
        if run.eval_due():
            run.evaluate()                            # kNN and diagnostics, logged
        run.epoch_done()                              # checkpoints
        if run.stop_requested():
            run.save_and_exit()
    run.finish({...})                                 # final evaluation, linear probe, summary.json

Guarantees: a run stopped at any step (a kill, a signal, ``checkpoint.stop_after_step``, an epoch's last step
included) resumes with ``resume=auto`` to the tensors of the uninterrupted run; the evaluation and its alignment
views draw nothing from the training's random streams. No checkpoint is written from a non-finite loss or
non-finite weights; the finiteness flag lives on the device and is read only at log and checkpoint steps.
SIGTERM, SIGUSR1 and SIGINT finish the current optimizer step on every rank (``stop_requested``: the ranks agree
on the step), then ``save_and_exit`` writes ``last.pt`` and exits with ``EXIT_STOPPED``; under SLURM with
``requeue: true`` a SIGUSR1 also requeues the job. A signal during an evaluation or the final probe stops it at
its next batch and exits the same way (as Ctrl-C ends any call). Decisions that stop a run are taken the same way
on every rank, which all exit with the same line and code.

Collapse signal: every log step records ``proj_std``, the std over the batch of the l2-normalised online
projections averaged over their d dimensions (``common.evaluate.projection_std``, returned by each script's loss;
each rank's batch, averaged over the ranks as every logged term); a whole log interval under ``COLLAPSE_FLOOR`` /
sqrt(d) prints one warning line, once per run. It adds no sync, no collective and no random draw to a step.
"""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

from common import checkpoint, data, dist, loaders, log
from common.augment import MultiViewDataset, ViewMaker
from common.config import UserError
from common.evaluate import Interrupted, final_linear_eval, monitor

EXIT_STOPPED = 3      # stopped by a signal after writing a checkpoint: resume=auto continues
ALIGN_SEED = 12345    # the alignment diagnostic's views: fixed images, fixed augmentations
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
# The collapse warning's threshold, over sqrt(d). Healthy: the l2-normalised projections spread over the unit
# sphere; the squares of a unit vector's d coordinates sum to 1, so each coordinate's variance across the batch is
# about 1/d and proj_std about 1/sqrt(d) (exactly, for a uniform spread). Collapsed: every image at (nearly) one
# point, proj_std -> 0. A tenth of the healthy value, at every step of a whole log interval, is a collapse (a
# collapse to a few directions keeps the spread along them: proj_std sees the complete collapse).
COLLAPSE_FLOOR = 0.1


class Run:
    def __init__(self, cfg, method):
        """Check that this run may start (run folder free, resume checkpoint readable and fitting, not finished)
        before anything is written; a run that fails before ``resume_or_evaluate_init`` leaves no new folder
        behind."""
        self.cfg, self.method, self._started = cfg, method, False
        self.device = dist.device(cfg)
        new_folder = not (Path(cfg.out_dir) / method / cfg.name).exists()
        self.dir = log.run_dir(cfg, method)
        if new_folder and dist.is_main():
            dist.on_exit(lambda: self._started or _prune(self.dir))
        dist.agree(lambda: lock(self.dir))  # one run per folder; a dead process's lock is taken over
        if dist.is_main():
            dist.on_exit(lambda: unlock(self.dir))
            for name in checkpoint.remove_stale_temporaries(self.dir / "checkpoints"):  # of a killed write
                print(f"note: removed checkpoints/{name}, left by a checkpoint write that was killed", flush=True)
        self._ckpt = checkpoint.resume_path(self.dir, cfg.resume)
        self.state = checkpoint.load(self._ckpt) if self._ckpt else None
        self._changes = checkpoint.check_resume(self.state, cfg, method) if self.state else {}
        if self.state and self.state["counters"].get("world_size", dist.world_size()) != dist.world_size():
            self._changes = {**self._changes, **_world_change(self.state, cfg)}
        if self.state and self._finished():
            raise dist.Stopped(0, f"run {self.dir} already finished (step {self.state['counters']['step']}, "
                                  "summary.json); nothing to do: set name=... for a new run")
        if self.state:  # a resume rewrites metrics.jsonl and config.yaml: refused before any work if it cannot
            dist.agree(lambda: _writable(self.dir / "metrics.jsonl", self.dir / "config.yaml"))
        dist.seed_everything(cfg.seed)  # the same initial weights on every rank
        self.accum, self._signal, self.logger = cfg.optim.accum_steps, None, None
        self._local_batch = cfg.optim.batch_size // dist.world_size()
        self._amp_dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16
        # what a checkpoint's "counters" hold: the position, the random-init kNN, throughput, time, changes, the
        # step of the collapse warning (None: not given)
        self.counters = dict(step=0, epoch=0, batch_in_epoch=0, knn_init=None, images=0, train_s=0.0, wall_s=0.0,
                             config_changes=[], collapse_warned=None)
        self._last_saved = (self._ckpt, self.state["counters"]["step"]) if self.state else None  # path, step
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)  # every loss so far finite (on device)
        self._t_start, self._last_eval = time.time(), None  # (epoch, metrics) of the last evaluation
        self._in_epoch, self.diagnostics = False, None
        self._proj_max, self._proj_full = None, True  # this log interval's largest proj_std; since its first step
        self._install_signal_handlers()

    # ------------------------------------------------------------------ set-up
    def views(self, n_views):
        """The ``n_views`` augmented views of each image (``augment``), on the training device, drawn from this
        rank's own stream (``dist.rank_seed``)."""
        cfg = self.cfg
        return ViewMaker(cfg.augment, n_views, cfg.data.image_size, *data.stats(cfg.data), self.device,
                         dist.rank_seed(cfg.seed))

    def loader(self, views):
        """This rank's SSL batches (``loaders.train_loader``); fixes the steps per epoch and the eval sets."""
        cfg = self.cfg
        self._ssl = data.load(cfg.data, "ssl")
        self._loader, self._sampler = loaders.train_loader(self._ssl, cfg, views, self.device)
        self.steps_per_epoch = len(self._loader) // self.accum
        if self.steps_per_epoch == 0:
            raise UserError(f"optim.batch_size x optim.accum_steps = {cfg.optim.batch_size * self.accum} exceeds "
                            f"the {len(self._ssl)} training images: lower optim.batch_size")
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.warmup_steps = cfg.optim.warmup_epochs * self.steps_per_epoch
        self.eval_sets = loaders.eval_loaders(cfg)  # (checks eval.knn_k against the memory bank's size)
        return self._loader

    @property
    def memory_format(self):
        """The models' memory format: ``torch.channels_last`` with ``channels_last: true``."""
        return torch.channels_last if self.cfg.channels_last else torch.preserve_format

    def resume_or_evaluate_init(self, encoder, diagnostics=None, **objects):
        """Remember the evaluated ``encoder``, the script's ``diagnostics(f_test)`` (a dict of its own metrics on
        the test images' encoder features, at every evaluation) and what a checkpoint holds (``objects``: anything
        with ``state_dict``: models, optimizer, GradScaler, ...). Then, resuming: load the checkpoint into the
        objects (their weights are replaced) and the RNGs, and do an evaluation a stop interrupted; a fresh run:
        log the kNN of the random-init encoder (the baseline SSL must beat) with ``diagnostics``."""
        self.encoder, self.diagnostics, self.objects, self._started = encoder, diagnostics, objects, True
        step = self.state["counters"]["step"] if self.state else None
        self.logger = log.Logger(self.dir, dist.is_main(), resume_step=step)  # (a fresh run: old records aside)
        if self.state:
            self.logger.print(f"resuming {self._ckpt} at step {step}")
        self.logger.config(self.cfg, keep_old=f"config_until_step{step}.yaml" if self._changes else None)
        if self.state:
            self.counters.update(checkpoint.restore(self.state, self.cfg, **objects))
            for rec in self.counters.pop("unlogged", []):  # records a failed write left out: first, in order
                self.logger.log(rec)
            last_eval = self.counters.pop("last_eval", None)  # (a stop during the final probe: not evaluated again)
            self._last_eval = tuple(last_eval) if last_eval else None
            self._proj_full = self.step % self.cfg.log.every == 0  # (mid-interval: its first steps ran before)
            if self.counters.pop("eval_pending", False):  # a stop during the epoch's evaluation: do it now
                self.evaluate()
            if self._changes:  # resume_allow_changes: recorded in metrics.jsonl and summary.json
                self.counters["config_changes"] = self.counters["config_changes"] + [{"step": self.step,
                                                                                     **self._changes}]
                self.log({"config_changed": self._changes})
            self.state = None
        else:
            k = self.cfg.eval.knn_k[0]
            out, f_test = monitor(encoder, self.eval_sets, self.device, self.cfg.eval, test_features=True)
            self.counters["knn_init"] = out[f"knn{k}"]
            self.log({f"knn{k}_init": out[f"knn{k}"], **(diagnostics(f_test) if diagnostics else {})})

    @property
    def step(self):
        """Optimizer steps done."""
        return self.counters["step"]

    @property
    def epoch(self):
        """Epochs done (during an epoch: the index of the one running)."""
        return self.counters["epoch"]

    # ------------------------------------------------------------------ the loop
    def epochs(self):
        """The index of each epoch still to run: ``range(the resumed epoch, optim.epochs)``."""
        return range(self.epoch, self.cfg.optim.epochs)

    def batches(self, loader):
        """Yield ``(batch, step_due)`` for the rest of this epoch: from the resumed position (the batches a
        checkpoint has consumed are skipped; an incomplete last accumulation group is dropped); ``step_due`` is
        true on the forward that completes an accumulation group (an optimizer step is due). When all are
        consumed the epoch counts as done (``run.epoch`` + 1, which ``eval_due`` and ``epoch_done`` read)."""
        c, per_epoch = self.counters, self.steps_per_epoch * self.accum
        self._sampler.set_epoch(c["epoch"])
        self._sampler.skip_batches = c["batch_in_epoch"]
        self._t_epoch, self._in_epoch = time.time(), True
        if c["batch_in_epoch"] < per_epoch:  # (a run stopped at an epoch's last step resumes at its end)
            for batch, _ in self.logger.progress(loader, len(loader), f"epoch {c['epoch']}"):
                if c["batch_in_epoch"] == per_epoch:
                    break
                c["batch_in_epoch"] += 1
                c["images"] += self._local_batch * dist.world_size()
                yield batch, c["batch_in_epoch"] % self.accum == 0
        c["train_s"] += time.time() - self._t_epoch
        c["epoch"], c["batch_in_epoch"], self._in_epoch = c["epoch"] + 1, 0, False

    def autocast(self):
        """``torch.autocast`` at the run's ``precision`` (bf16, fp16; fp32: disabled), for the forward and loss."""
        return torch.autocast(self.device.type, self._amp_dtype, enabled=self.cfg.precision != "fp32")

    def step_done(self, loss, logs=None, **scalars):
        """Bookkeeping after an optimizer step: count it; every ``log.every`` steps log the mean over ranks of
        ``loss`` and ``logs`` (tensors; ``proj_std``: the collapse signal) with ``scalars`` (lr, tau), print the
        progress line (between log steps too, once ``log.PLAIN_EVERY_S`` s passed: ``Logger.line_due``), check
        that they are finite (the NaN guard: a ``UserError``) and whether the online projections collapsed (one
        warning line); write ``last.pt`` every ``checkpoint.every_steps``."""
        c, cfg, logs = self.counters, self.cfg, {**(logs or {}), **scalars}
        c["step"] += 1
        self._finite &= torch.isfinite(loss.detach()).all()
        if torch.is_tensor(logs.get("proj_std")):  # this interval's largest, on the device (no sync)
            p = logs["proj_std"].detach().float()
            self._proj_max = p if self._proj_max is None else torch.maximum(self._proj_max, p)
        if c["step"] % cfg.log.every == 0 or c["step"] == self.total_steps:
            names = [k for k, v in logs.items() if torch.is_tensor(v)]
            extra = [self._proj_max] if self._proj_max is not None else []
            vals = torch.stack([loss.detach().float(), *(logs[k].detach().float() for k in names), *extra,
                                self._finite.float()])
            vals = dist.all_reduce_mean(vals).tolist()
            if vals[-1] < 1 or any(v != v or abs(v) == float("inf") for v in vals[:-1]):
                self._diverged(vals[0])
            rec = dict(zip(names, vals[1:]))
            self.log({"loss": vals[0], **rec, **{k: v for k, v in logs.items() if not torch.is_tensor(v)}})
            self.logger.progress_line(c["step"], self.total_steps, c["epoch"], vals[0], c["images"],
                                      c["train_s"] + time.time() - self._t_epoch, rec.get("proj_std"))
            if extra:
                self._collapse_check(vals[-2])
            self._proj_max, self._proj_full = None, True
        elif self.logger.line_due():  # 30 s since the last line (rank 0): this rank's numbers, read (synced) only now
            p = logs.get("proj_std")
            self.logger.progress_line(c["step"], self.total_steps, c["epoch"], loss.detach().float().item(),
                                      c["images"], c["train_s"] + time.time() - self._t_epoch,
                                      p.detach().float().item() if torch.is_tensor(p) else None)
        if cfg.checkpoint.every_steps and c["step"] % cfg.checkpoint.every_steps == 0:
            self.save("last.pt")

    def _collapse_check(self, proj_max):
        """One warning line, once per run, when this whole log interval's largest ``proj_std`` (mean over the
        ranks of each one's largest) stayed under ``COLLAPSE_FLOOR`` / sqrt(d) (an interval cut by a resume is not
        judged: its first steps ran in another process)."""
        d = self.cfg.model.proj_dim
        floor, every, step = COLLAPSE_FLOOR / d ** 0.5, self.cfg.log.every, self.step
        if proj_max < floor and self._proj_full and self.counters["collapse_warned"] is None:
            self.counters["collapse_warned"] = step
            first = step - (step - 1) % every  # (the interval since the last log step)
            self.logger.print(f"warning: the online projections collapsed: proj_std {proj_max:.3g} < "
                              f"{COLLAPSE_FLOOR}/sqrt({d}) = {floor:.3g} over steps {first}-{step} (its largest there; "
                              f"healthy: about 1/sqrt({d}) = {d ** -0.5:.3g}); the run goes on")

    def stop_requested(self):
        """Did any rank get a signal (SIGTERM, SIGUSR1, SIGINT), or is this ``checkpoint.stop_after_step``? The
        same answer on every rank (a collective: every rank asks at the same points)."""
        return self._signalled() or self.step == self.cfg.checkpoint.stop_after_step

    def save_and_exit(self):
        """Write ``last.pt`` and end the process (``dist.Stopped``: exit status ``EXIT_STOPPED`` for a signal, 0
        for ``checkpoint.stop_after_step``; under SLURM with ``requeue``, a signal requeues the job)."""
        if self._in_epoch:  # (mid-epoch: the epoch's training time so far)
            self.counters["train_s"] += time.time() - self._t_epoch
            self._t_epoch = time.time()
        self._stop()

    # ------------------------------------------------------------------ end of epoch, end of run
    def eval_due(self):
        """Is an evaluation due at the end of this epoch: every ``eval.every`` epochs, and after the last?"""
        every = self.cfg.eval.every
        return self.epoch == self.cfg.optim.epochs or bool(every and self.epoch % every == 0)

    def evaluate(self):
        """The run's evaluation of its frozen encoder (every rank calls it): ``common.evaluate.monitor``'s kNN,
        uniformity, centre norm, feature std and the alignment of two fixed views of fixed images, with the
        script's ``diagnostics(f_test)`` on the test images' encoder features; logged, printed, and returned. (A
        signal during it stops it at its next batch: ``last.pt``, exit; ``resume=auto`` evaluates first.)"""
        try:
            out, f_test = monitor(self.encoder, self.eval_sets, self.device, self.cfg.eval,
                                  views=self._alignment_views(), test_features=True, stop=self._signalled)
        except Interrupted:  # a signal: the epoch's state, then exit; resume=auto evaluates first
            self._stop(eval_pending=True)
        metrics = {**out, **(self.diagnostics(f_test) if self.diagnostics else {})}
        self._last_eval = (self.epoch, metrics)
        self.log(metrics)
        self.logger.print(f"epoch {self.epoch} step {self.step} " + " ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)) and "/" not in k))
        return metrics

    def log(self, metrics):
        """One line of ``metrics.jsonl`` (rank 0) at the current step and epoch; one that cannot be written is kept
        in the checkpoint (counters' ``unlogged``) and written first on resume."""
        rec = {"step": self.step, "epoch": self.epoch, **metrics}
        try:
            self.logger.log(rec)
        except OSError as e:
            rec = json.loads(json.dumps(rec, default=float))  # (plain numbers: a weights_only load reads them)
            self.counters["unlogged"] = [*self.counters.get("unlogged", []), rec]
            self._cannot_write(self.logger.metrics, e)

    def _cannot_write(self, path, e):
        """A run-folder file cannot be written (rank 0): keep the step reached in ``last.pt`` if possible (rank 0
        alone: no collective, the other ranks may be elsewhere), then one line."""
        try:
            ok = bool(self._finite) and all(p.isfinite().all() for p in self._params())
            checkpoint.save(self._snapshot(), self.dir / "checkpoints" / "last.pt") if ok else None
            kept = f"checkpoints/last.pt holds step {self.step}" if ok else "no checkpoint written (not finite)"
        except (OSError, UserError):
            kept = f"no checkpoint could be written either; the last is {self._last_saved and self._last_saved[0]}"
        raise UserError(f"cannot write {path} ({e.strerror or e}): {kept}; make {self.dir} writable (its .lock "
                        "is taken over by the next run), then resume=auto") from None

    def epoch_done(self):
        """Checkpoints at the end of an epoch: ``last.pt`` every ``checkpoint.every`` epochs and after the last
        (with ``epoch_XXXX.pt`` every ``checkpoint.keep_every``)."""
        c, cfg = self.counters, self.cfg
        if c["epoch"] == cfg.optim.epochs or c["epoch"] % cfg.checkpoint.every == 0:
            self.save("last.pt")
            if cfg.checkpoint.keep_every and c["epoch"] % cfg.checkpoint.keep_every == 0:
                self.save(f"epoch_{c['epoch']:04d}.pt")

    def finish(self, fields=None):
        """Final evaluation (the last epoch's, if it ran in this process), the linear probe, ``summary.json``
        (with ``fields``). (A signal during them: ``last.pt``, exit; ``resume=auto`` does them again.)"""
        c, cfg = self.counters, self.cfg
        final = self._last_eval[1] if self._last_eval and self._last_eval[0] == c["epoch"] else self.evaluate()
        try:
            linear = final_linear_eval(self.encoder, self.eval_sets, self.device, cfg, stop=self._signalled)
        except Interrupted:  # a signal during the probe: last.pt holds the last step; resume=auto probes again
            self._stop()
        wall = c["wall_s"] + time.time() - self._t_start
        summary = {"method": self.method, "knn_k": cfg.eval.knn_k[0], "knn_t": cfg.eval.knn_t,
                   "knn_init": c["knn_init"], **final, **linear, **(fields or {}),
                   "images_per_s": round(c["images"] / max(c["train_s"], 1e-9), 1),
                   "train_time_s": round(c["train_s"], 2), "wall_time_s": round(wall, 2),
                   "steps": c["step"], "epochs": c["epoch"], "config_changes": c["config_changes"]}
        try:
            self.logger.summary(summary)
        except OSError as e:
            self._cannot_write(self.dir / "summary.json", e)
        dist.barrier()

    # ------------------------------------------------------------------ checkpoints, stops
    def save(self, name, **extra):
        """Write ``checkpoints/<name>`` (rank 0) after every rank checked that the loss and weights are finite;
        ``extra`` counters go into this checkpoint only."""
        ok = self._finite & torch.stack([p.isfinite().all() for p in self._params()]).all()
        if dist.all_reduce_mean(ok.float()).item() < 1:
            self._diverged(float("nan"))
        path = self.dir / "checkpoints" / name
        self.counters["wall_s"] += time.time() - self._t_start
        self._t_start = time.time()
        dist.agree(lambda: checkpoint.save(self._snapshot(**extra), path))  # rank 0 writes; a failed write
        self._last_saved = (path, self.step)                                 # (disk full) stops every rank alike
        dist.barrier()

    def _snapshot(self, **extra):
        """What a checkpoint holds: the objects, the counters with the number of processes and the last evaluation
        (a run stopped during its final probe does not evaluate again), ``extra``."""
        counters = {**self.counters, "world_size": dist.world_size(), "last_eval": self._last_eval, **extra}
        return checkpoint.snapshot(self.cfg, counters, self.method, **self.objects)

    def _params(self):
        return [p for o in self.objects.values() if isinstance(o, torch.nn.Module) for p in o.parameters()] or \
            [torch.zeros(())]

    def _diverged(self, value):
        where = (f"the last good checkpoint is {self._last_saved[0]} (step {self._last_saved[1]}): lower optim.lr "
                 "and resume=auto resume_allow_changes=true (a changed lr is refused without it)" if self._last_saved
                 else "no checkpoint was written before: lower optim.lr and start again")
        raise UserError(f"loss or weights are not finite ({value}) by step {self.step}: training diverged; {where}")

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self._signal is None:
                self._signal = signal.Signals(signum).name
                if dist.is_main():
                    print(f"{self._signal}: finishing the current step, then writing a checkpoint", flush=True)
        for name in SIGNALS:
            if os.environ.get("ONEFILE_SPAWNED") and name == "SIGINT":
                continue  # spawned ranks: the launcher forwards Ctrl-C as SIGTERM
            old = signal.signal(getattr(signal, name), handler)
            dist.on_exit(lambda n=name, o=old: signal.signal(getattr(signal, n), o))

    def _signalled(self):
        """Did any rank get a signal? The same answer on every rank."""
        return dist.any_rank(self._signal is not None)

    def _stop(self, eval_pending=False):
        """Write ``last.pt`` and end the run (``dist.Stopped``; under SLURM with ``requeue``, requeue the job);
        ``eval_pending``: stopped during an epoch's evaluation, which a resumed run does first."""
        self.save("last.pt", eval_pending=eval_pending)
        if self._signal is None:
            raise dist.Stopped(0, f"stopped after step {self.step} as asked (checkpoint.stop_after_step)")
        msg = f"stopped by {self._signal} after step {self.step}: {self._last_saved[0]} written; " \
              "continue with resume=auto"
        if self.cfg.requeue and "SLURM_JOB_ID" in os.environ and dist.is_main():
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
            msg += f"; SLURM job {os.environ['SLURM_JOB_ID']} requeued"
        raise dist.Stopped(EXIT_STOPPED, msg)

    def _finished(self):
        summary = self.dir / "summary.json"
        try:
            done = json.loads(summary.read_text()).get("steps") == self.state["counters"]["step"]
        except (OSError, ValueError):
            return False
        return done and self.state["counters"]["epoch"] >= self.cfg.optim.epochs

    def _alignment_views(self):
        """Two views of the first 128 SSL images, made afresh at each evaluation from ``ALIGN_SEED``: the same
        pairs every epoch, and no draw from any of the training's random streams."""
        cfg, n = self.cfg, min(128, len(self._ssl))
        maker = ViewMaker(cfg.augment, 2, cfg.data.image_size, *data.stats(cfg.data), self.device, ALIGN_SEED)
        with torch.random.fork_rng(devices=[]):
            if maker.path == "batched":
                batch = self._ssl.images[:n]
            else:
                ds = MultiViewDataset(self._ssl, maker.cpu_transforms(), ALIGN_SEED)
                batch = default_collate([ds[i] for i in range(n)])[0]
            return maker(batch)


def _world_change(state, cfg):
    """Resuming on another number of processes: each rank's augmentation stream depends on its rank, so the run
    continues, but not as the uninterrupted run would. Refused unless ``resume_allow_changes`` (then recorded)."""
    old, new = state["counters"]["world_size"], dist.world_size()
    if not cfg.resume_allow_changes:
        raise UserError(f"the checkpoint was written by {old} processes, this run has {new}: the augmentations depend "
                        f"on the rank, so it would not continue as the run would have; resume on {old} processes, or "
                        "set resume_allow_changes=true to continue on these (recorded in metrics.jsonl and "
                        "summary.json)")
    if dist.is_main():
        print(f"note: resuming a run of {old} processes on {new} (resume_allow_changes=true): recorded in "
              "config_changes", flush=True)
    return {"processes": [old, new]}


def _writable(*paths):
    """One line if one of the existing ``paths`` cannot be opened for appending (as after ``chmod a-w``)."""
    for path in paths:
        try:
            if path.exists():
                open(path, "a").close()
        except OSError as e:
            raise UserError(f"cannot write {path.resolve()} ({e.strerror or e}): make it writable (chmod u+w "
                            f"{path.name}), then resume=auto") from None


# ---------------------------------------------------------------------- the run folder's lock
def lock(run_dir):
    """Take ``run_dir/.lock`` (pid, host, SLURM job); refuse if a live process holds it; take over the lock of a
    dead process on this host, or of this SLURM job's earlier allocation (a requeued job may land elsewhere)."""
    path, host = Path(run_dir) / ".lock", socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, ValueError):
                owner = {}
            job = os.environ.get("SLURM_JOB_ID")
            requeued = job is not None and owner.get("slurm_job") == job  # this job's earlier allocation: gone
            if not requeued and (owner.get("host") != host or checkpoint.pid_alive(int(owner.get("pid", -1)))):
                raise UserError(f"run folder {Path(run_dir).resolve()} is in use by pid {owner.get('pid')} on "
                                f"{owner.get('host')} (since {owner.get('since')}): wait for it or set name=...; if "
                                f"that process is gone, delete {path.resolve()}") from None
            print(f"note: took over the lock of pid {owner.get('pid')} on {owner.get('host')}, which is no longer "
                  f"running{' (this SLURM job, requeued)' if requeued else ''}", flush=True)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "slurm_job": os.environ.get("SLURM_JOB_ID")}, f)
        return
    raise UserError(f"could not take the lock {path.resolve()}: another run is starting in that folder")


def _prune(run_dir):
    """Remove a run folder this run created if it holds nothing (the run stopped before it started)."""
    for d in (Path(run_dir) / "checkpoints", Path(run_dir)):
        try:
            d.rmdir()
        except OSError:
            return


def unlock(run_dir):
    path = Path(run_dir) / ".lock"
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
