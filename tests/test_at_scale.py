"""common.tools.at_scale (``python -m common.tools.benchmark --at-scale``): the measured activation memory is the
bytes saved for backward, linear in the batch and at least the views themselves; the computed tables follow
their stated formulas; the benchmark's JPEGs have ImageNet's typical geometry."""
import math

import pytest
import torch

from common.config import parse
from common.tools import at_scale

from scriptrun import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def test_saved_bytes_grow_linearly_with_the_batch_and_hold_the_views():
    """The quickstart's BYOL + uniformity step (16 px) at batches 2, 4, 6: the same bytes per added image (a
    count that missed or double-counted a storage would not be linear), at least the two fp32 views an image
    brings (the first conv saves its input), and the parameters are those of f, g, q and the target's f, g."""
    import byol_uniform
    path = ROOT / "configs" / "quickstart" / "byol_uniform.yaml"
    cfg = parse(["--config", str(path)], byol_uniform.DEFAULTS, method="byol_uniform")
    m = {b: at_scale.step_memory("byol_uniform", path, cfg, b) for b in (2, 4, 6)}
    per_image = (m[4]["saved"] - m[2]["saved"]) / 2
    assert m[6]["saved"] - m[4]["saved"] == pytest.approx(2 * per_image, rel=0.02), m
    size = cfg.data.image_size
    assert per_image >= 2 * 3 * size * size * 4, per_image
    online = byol_uniform.Online(cfg.model)
    assert m[2]["online"] == sum(p.numel() for p in online.parameters())
    assert m[2]["target"] == sum(p.numel() for p in (*online.f.parameters(), *online.g.parameters()))
    assert m[2]["opt_state"] > 0  # LARS's momentum


def test_largest_batch_formula():
    m = {"online": 10 ** 6, "target": 10 ** 6, "opt_state": 4 * 10 ** 6, "fixed": 0, "per_image": 2 * 2 ** 20}
    static = 14 * 10 ** 6 + 4 * 10 ** 6 + 4 * 10 ** 6
    free = 0.9 * 80 * 2 ** 30 - 2 * 2 ** 30 - static
    assert at_scale.largest_bf16_batch(m, 80) == math.floor(free / 2 ** 20)
    assert at_scale.largest_bf16_batch({**m, "per_image": 10 ** 12}, 40) == 0


def test_eval_memory_before_and_after_sharding():
    n, q, d, k = at_scale.SIZES["imagenet"] + (2048, 200)
    before, after1 = at_scale.eval_memory(n, q, d, 1, k)
    assert before == 4 * (2 * n * d + q * d) == at_scale.eval_memory(n, q, d, 64, k)[0]  # W does not help
    assert after1 < before and at_scale.eval_memory(n, q, d, 8, k)[1] < after1
    assert at_scale.eval_memory(n, q, d, 8, k)[1] == 4 * (math.ceil(n / 8) * d + q * d) + 1024 * 8 * k * 12


def test_eval_time_model():
    """A BYOL epoch costs N (2 fwd+bwd + 2 target forwards) = N 8/3 units; a kNN pass (N + Q)/3; the probe
    E N/3 + Q/3."""
    import byol_uniform
    cfg = parse(["--config", str(ROOT / "configs" / "byol_uniform" / "imagenet_resnet50_300ep.yaml")],
                byol_uniform.DEFAULTS, method="byol_uniform")
    n, q = at_scale.SIZES["imagenet"]
    knn, probe = at_scale.eval_time("byol_uniform", cfg, has_target=True)
    assert knn == pytest.approx((n + q) / 3 / (n * 8 / 3))
    assert probe == pytest.approx((80 * n / 3 + q / 3) / (n * 8 / 3))


def test_benchmark_jpegs_have_imagenet_geometry(tmp_path):
    from PIL import Image
    paths, kib = at_scale.write_jpegs(tmp_path, n=2)
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.size == (500, 375)
    assert 40 < kib < 200, kib


def test_paper_configs_leave_out_fashion_mnist_bases_and_toys():
    names = {f"{p.parent.name}/{p.stem}" for _, p, _ in at_scale.paper_configs()}
    assert "byol_mhe/imagenet_resnet50_300ep" in names and "raft/raft-mlpp" in names
    assert not [n for n in names if "fashion_mnist" in n or "/_" in n or "toy" in n], names
    assert torch.get_num_threads() == 1  # (the fixture)


def test_digest_cost_measures_save_and_read_with_and_without():
    tiny = ["model.arch=resnet18", "model.width=8", "model.proj_hidden=16", "model.proj_dim=8", "model.pred_hidden=16"]
    c = at_scale.digest_cost(overrides=tiny, repeats=1)
    assert all(c[k] > 0 for k in ("digest", "save_False", "save_True", "read_False", "read_True"))
    assert 0 < c["bytes_True"] - c["bytes_False"] < 300  # the hex string and its key
