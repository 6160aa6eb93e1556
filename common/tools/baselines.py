"""The two baselines of a results table, with the method scripts' bookkeeping (``common.run.Run``): the same run
folder, resume, evaluation and ``summary.json`` keys as a method's run.

    python -m common.tools.baselines --config configs/baselines/fashion_mnist_supervised.yaml
    python -m common.tools.baselines --config configs/baselines/fashion_mnist_random.yaml --set seed=1

``baseline: supervised``  the ceiling: the encoder f and a linear classifier trained with the labels
                          (cross-entropy over both views, one forward) on the views the SSL scripts train on
                          (the same ``ViewMaker``, the same ``augment`` settings), SGD with warm-up + cosine.
``baseline: random``      the floor: no training. The seeded initial encoder, evaluated exactly as an SSL run's
                          final evaluation (kNN, uniformity, ..., then the linear probe). Its kNN is the
                          ``knn_init`` that an SSL run with the same seed and encoder logs at step 0.

Both report the frozen encoder's kNN and linear probe (``eval.*``), as the SSL runs do, not the classifier
trained with it. The run folder is ``out_dir/<baseline>/<name>``.
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import data, dist
from common.config import parse
from common.models import maybe_compile, resnet
from common.optim import build, lr_at, param_groups, scaled_lr, set_lr
from common.run import Run

DEFAULTS = {
    "baseline": "supervised",  # supervised | random
    "optim": {"name": "sgd", "lr": 0.1, "lr_scaling": "linear",  # lr = 0.1 x batch / 256 (Goyal et al.)
              "weight_decay": 5.0e-4, "batch_size": 256, "epochs": 10, "warmup_epochs": 1},
}
CHOICES = {"baseline": ("supervised", "random")}


class Supervised(nn.Module):
    """The encoder f (named ``f`` as in every script: ``common.evaluate`` and ``export`` find it) and a linear
    classifier on its features."""

    def __init__(self, m, num_classes):
        super().__init__()
        self.f, dim = resnet(m.arch, m.width, m.cifar_stem, m.norm, m.zero_init_residual)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.f(x))


class WithLabels:
    """``Run.batches`` hands a script the first item of each loader item; this loader's first item is the pair
    (images, labels), so the supervised loop gets the labels."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return (((x, y), y) for x, y in self.loader)


def train(cfg):
    run = Run(cfg, cfg.baseline)  # run folder out_dir/<baseline>/<name> (locked), logger, resume, seeds, signals
    views = run.views(2)  # the SSL scripts' two views
    loader = WithLabels(run.loader(views))  # (also the eval sets: the kNN bank, the test set)
    model = Supervised(cfg.model, data.num_classes(cfg.data))
    model = dist.sync_bn(model, cfg).to(run.device, memory_format=run.memory_format)
    if cfg.baseline == "random":  # the initial encoder, evaluated as a run's end: no step, no checkpoint
        run.resume_or_evaluate_init(model.f, online=model)
        return run.finish({"baseline": "random"})

    peak_lr = scaled_lr(cfg.optim)
    opt = build(cfg.optim, param_groups([model], cfg.optim.weight_decay, cfg.optim.exclude_bias_norm), peak_lr)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.precision == "fp16")
    maybe_compile(model.f, cfg)
    ddp = dist.ddp(model, run.device)
    run.resume_or_evaluate_init(model.f, online=model, optimizer=opt, scaler=scaler, views=views)
    for epoch in run.epochs():
        for (images, labels), step_due in run.batches(loader):
            x1, x2 = views(images)
            labels = labels.to(run.device)
            with dist.no_sync(ddp, unless=step_due):
                with run.autocast():
                    loss = F.cross_entropy(ddp(torch.cat([x1, x2])).float(), torch.cat([labels, labels]))  # both views
                scaler.scale(loss / cfg.optim.accum_steps).backward()
            if step_due:
                lr = set_lr(opt, lr_at(run.step, run.total_steps, run.warmup_steps, peak_lr))
                if cfg.optim.clip_grad > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                run.step_done(loss, lr=lr)
                if run.stop_requested():
                    run.save_and_exit()
        if run.eval_due():
            run.evaluate()
        run.epoch_done()
        if run.stop_requested():
            run.save_and_exit()
    run.finish({"baseline": "supervised"})


if __name__ == "__main__":
    dist.launch(train, parse(sys.argv[1:], DEFAULTS, CHOICES, method="baselines"))
