"""Tests for common/augment.py: batched ops vs torchvision, CPU vs batched statistics,
per-sample independence, determinism and resume, eval transforms."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, so `common` imports without a conftest
from common import augment as A  # noqa: E402
from common.config import UserError  # noqa: E402

AUG = dict(path="batched", crop_scale=[0.08, 1.0], crop_ratio=[0.75, 4 / 3], flip_p=0.5,
           jitter=[0.4, 0.4, 0.2, 0.1], jitter_p=0.8, gray_p=0.2, blur_p=[1.0, 0.1],
           blur_sigma=[0.1, 2.0], solarize_p=[0.0, 0.2])
ZERO, ONE = [0.0] * 3, [1.0] * 3  # mean 0, std 1: outputs stay in [0, 1]
N = 2000  # views per path in the statistical tests


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small per-image ops: one intra-op thread is faster, and robust on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _spec(view=1, **over):
    return {**A.view_specs(AUG, 2)[view], **over}


def _structured(n, size=32, seed=0):
    """Colourful smooth images with texture: a random 4x4 colour field upsampled, plus noise."""
    g = _gen(seed)
    field = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear")
    x = 0.85 * field + 0.15 * torch.rand(n, 3, size, size, generator=g)
    return (x * 255).round().to(torch.uint8)


def _ramps(n, size=32):
    """R encodes the column, G the row, B constant: a view's R/G ranges measure its crop."""
    t = (torch.arange(size) + 0.5) / size
    img = torch.stack([t.expand(size, size), t[:, None].expand(size, size), torch.full((size, size), 0.5)])
    return (img * 255).round().to(torch.uint8).expand(n, 3, size, size).contiguous()


def _cpu(x, spec, size=32, seed=0, mean=ZERO, std=ONE):
    torch.manual_seed(seed)
    t = A.cpu_view(size, spec, mean, std)
    return torch.stack([t(img) for img in x])


def _batched(x, spec, size=32, seed=0, mean=ZERO, std=ONE):
    return A.batched_view(x, size, spec, mean, std, generator=_gen(seed))


def _is_gray(v):
    return (v[:, 0] == v[:, 1]).all((1, 2)) & (v[:, 1] == v[:, 2]).all((1, 2))


# ------------------------------------------------------------------------ config helpers
def test_blur_kernel_size():
    assert A.blur_kernel_size(224) == 23
    assert (A.blur_kernel_size(32), A.blur_kernel_size(96), A.blur_kernel_size(8)) == (3, 9, 3)
    assert all(A.blur_kernel_size(s) % 2 == 1 and A.blur_kernel_size(s) >= 3 for s in range(1, 600))


def test_view_specs_cycle_per_view_lists():
    specs = A.view_specs(AUG, 4)
    assert [s["blur_p"] for s in specs] == [1.0, 0.1, 1.0, 0.1]
    assert [s["solarize_p"] for s in specs] == [0.0, 0.2, 0.0, 0.2]
    assert all(s["jitter"] == (0.4, 0.4, 0.2, 0.1) and s["crop_scale"] == (0.08, 1.0) for s in specs)
    three = A.view_specs({**AUG, "blur_p": [1.0, 0.5, 0.0], "solarize_p": 0.3}, 3)
    assert [s["blur_p"] for s in three] == [1.0, 0.5, 0.0]
    assert [s["solarize_p"] for s in three] == [0.3] * 3


# ------------------------------------------------- batched ops == torchvision kernels
# The three blends of ``A._jitter`` (clamp(f x + (1 - f) m, 0, 1)), one at a time: m = 0, the mean luma, the luma.
def _brightness(x, f):
    return A._blend(x, torch.zeros(()), f)


def _contrast(x, f):
    return A._blend(x, A._luma(x).mean((1, 2, 3), keepdim=True), f)


def _saturation(x, f):
    return A._blend(x, A._luma(x), f)


def test_batched_colour_ops_match_torchvision():
    x = _structured(6).float() / 255
    f = torch.tensor([0.6, 0.8, 1.0, 1.1, 1.3, 1.4]).view(6, 1, 1, 1)
    shift = torch.tensor([-0.1, -0.05, 0.0, 0.02, 0.07, 0.1]).view(6, 1, 1, 1)
    pairs = [(_brightness(x, f), TF.adjust_brightness, f), (_contrast(x, f), TF.adjust_contrast, f),
             (_saturation(x, f), TF.adjust_saturation, f), (A._hue(x, shift), TF.adjust_hue, shift)]
    for ours, ref, factors in pairs:
        want = torch.stack([ref(x[i], factors[i].item()) for i in range(6)])
        torch.testing.assert_close(ours, want, atol=2e-6, rtol=0, msg=ref.__name__)
    gray = torch.stack([TF.rgb_to_grayscale(x[i], 3) for i in range(6)])
    torch.testing.assert_close(A._luma(x).expand_as(x), gray, atol=1e-6, rtol=0)


def test_batched_blur_matches_torchvision():
    x = _structured(4).float() / 255
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    for k in (3, 9):
        want = torch.stack([TF.gaussian_blur(x[i], [k, k], [sigma[i].item()] * 2) for i in range(4)])
        torch.testing.assert_close(A._gaussian_blur(x, k, sigma), want, atol=1e-5, rtol=0)


def test_batched_crop_matches_torchvision_resized_crop():
    """The affine grid_sample equals torchvision's (non-antialiased) bicubic resized_crop."""
    x = _structured(4, size=40).float() / 255
    top, left = torch.tensor([0.0, 5.0, 12.0, 3.0]), torch.tensor([0.0, 9.0, 2.0, 20.0])
    h, w = torch.tensor([40.0, 17.0, 25.0, 9.0]), torch.tensor([40.0, 22.0, 30.0, 11.0])
    flip = torch.tensor([False, True, False, True])
    ours = A._resized_crop(x, top, left, h, w, flip, 24)
    want = torch.stack([TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [24, 24],
                                        interpolation=T.InterpolationMode.BICUBIC, antialias=False)
                        for i in range(4)])
    want = torch.where(flip.view(4, 1, 1, 1), want.flip(-1), want)
    torch.testing.assert_close(ours[0], want[0], atol=1e-4, rtol=0)  # whole image: everywhere
    # inside a box, bicubic taps near its edge read the true neighbours where torchvision
    # (crop, then resize) replicates the box's edge: compare away from the edge (2 source px)
    torch.testing.assert_close(ours[..., 6:-6, 6:-6], want[..., 6:-6, 6:-6], atol=1e-4, rtol=0)
    assert not torch.allclose(ours[1:], want[1:], atol=1e-4)  # (and the edges do differ)


def test_batched_identity_and_flip_are_exact():
    x = _structured(8)
    off = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0,
               solarize_p=0.0)
    for flip_p, want in ((0.0, x), (1.0, x.flip(-1))):
        got = _batched(x, _spec(**off, flip_p=flip_p))
        torch.testing.assert_close(got, want.float() / 255, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(32, 32), (8, 64), (64, 8)])
def test_box_sampler_matches_torchvision(hw):
    """Area fraction, aspect ratio and fallback rate of the vectorised sampler vs
    RandomResizedCrop.make_params; elongated inputs exercise the centre-crop fallback."""
    H, W = hw
    rrc = T.RandomResizedCrop(16, scale=(0.08, 1.0), ratio=(0.75, 4 / 3))
    torch.manual_seed(0)
    ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in
                        (rrc.make_params([torch.zeros(1, H, W)]) for _ in range(3000))]).float()
    g = _gen(1)
    ours = torch.stack(A._sample_boxes(lambda *s: torch.rand(*s, generator=g), 3000, H, W,
                                       (0.08, 1.0), (0.75, 4 / 3)), 1)
    for boxes in (ref, ours):
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
        assert (h >= 1).all() and (w >= 1).all() and (boxes == boxes.round()).all()
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for stat in (lambda b: b[:, 2] * b[:, 3] / (H * W), lambda b: (b[:, 3] / b[:, 2]).log()):
        torch.testing.assert_close(stat(ours).quantile(q), stat(ref).quantile(q), atol=0.04, rtol=0)
    fallback = [(b == b.mode(0).values).all(1).float().mean() for b in (ours, ref)]  # the centre box
    assert abs(fallback[0] - fallback[1]) < 0.04, fallback


# -------------------------------------------------------- CPU path vs batched path
@pytest.mark.parametrize("view,in_size", [(0, 32), (1, 32), (1, 64)])
def test_paths_agree_mean_std(view, in_size):
    """Output statistics of the two paths on the same images; 64 -> 32 shrinks crops
    (antialiased on the CPU path only). Standard error of a gap: ~0.005."""
    x = _structured(N, size=in_size, seed=view + in_size)
    cpu, bat = _cpu(x, _spec(view)), _batched(x, _spec(view))
    assert cpu.shape == bat.shape == (N, 3, 32, 32) and bat.dtype == torch.float32
    # per-channel mean / std over all pixels of all views, and the spread of per-image
    # means (sensitive to the jitter / solarisation strengths)
    for stat in (lambda v: v.mean((0, 2, 3)), lambda v: v.std((0, 2, 3)), lambda v: v.mean((2, 3)).std(0)):
        torch.testing.assert_close(stat(bat), stat(cpu), atol=0.02, rtol=0)


def test_hybrid_path_agrees_with_cpu_path():
    """augment.path hybrid: crop + flip per image (uint8, as in the workers), the photometric ops batched
    on the device; its output statistics match the CPU path's (64 -> 32: antialiased crops on both)."""
    x = _structured(N, size=64, seed=11)
    vm = A.ViewMaker({**AUG, "path": "hybrid"}, 2, 32, ZERO, ONE, "cpu", seed=0)
    torch.manual_seed(0)
    crops = [torch.stack([t(img) for img in x]) for t in vm.cpu_transforms()]
    assert all(type(c) is torch.Tensor and c.dtype == torch.uint8 and c.shape == (N, 3, 32, 32) for c in crops)
    views = vm(crops)
    for j, hyb in enumerate(views):
        cpu = _cpu(x, _spec(j), seed=j)
        for stat in (lambda v: v.mean((0, 2, 3)), lambda v: v.std((0, 2, 3)), lambda v: v.mean((2, 3)).std(0)):
            torch.testing.assert_close(stat(hyb), stat(cpu), atol=0.02, rtol=0)
    plain = A.ViewMaker({**AUG, "path": "hybrid", "jitter_p": 0.0, "gray_p": 0.0, "blur_p": [0.0],
                         "solarize_p": [0.0]}, 1, 32, ZERO, ONE, "cpu", seed=0)
    torch.testing.assert_close(plain(crops[:1])[0], crops[0].float() / 255)  # photometric ops off: the crops


def test_paths_agree_normalisation():
    x, mean, std = _structured(200, seed=3), [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    spec = _spec(1, jitter_p=0.0)
    for run in (_cpu, _batched):
        unit, norm = run(x, spec), run(x, spec, mean=mean, std=std)
        m, s = (torch.tensor(v).view(3, 1, 1) for v in (mean, std))
        torch.testing.assert_close(norm, (unit - m) / s)


def test_paths_agree_grayscale_fraction():
    """Colourful inputs: a view has R == G == B exactly iff it was grayscaled (jitter on)."""
    x = _structured(N, seed=4)
    fractions = [_is_gray(run(x, _spec(1))).float().mean().item() for run in (_cpu, _batched)]
    assert all(abs(f - 0.2) < 0.035 for f in fractions), fractions
    assert abs(fractions[0] - fractions[1]) < 0.04, fractions


def test_paths_agree_solarize_fraction():
    """Bright inputs (all pixels in [0.7, 1], jitter off) stay above 0.5 unless solarised."""
    x = (178 + torch.rand(N, 3, 32, 32, generator=_gen(5)) * 77).to(torch.uint8)
    for view, p in ((0, 0.0), (1, 0.2)):
        fractions = [(run(x, _spec(view, jitter_p=0.0)).mean((1, 2, 3)) < 0.5).float().mean().item()
                     for run in (_cpu, _batched)]
        assert all(abs(f - p) < 0.035 for f in fractions), (view, fractions)
        assert abs(fractions[0] - fractions[1]) < 0.04, fractions


def test_paths_agree_crop_area_distribution():
    """Crop width/height recovered from coordinate-ramp images; compare area quantiles."""
    x = _ramps(N)
    spec = _spec(0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    areas = []
    for run in (_cpu, _batched):
        v = run(x, spec)
        extent = v[:, :2].amax((2, 3)) - v[:, :2].amin((2, 3))  # [N, 2]: ~ w / W, h / H
        areas.append((extent[:, 0] * extent[:, 1]).quantile(q))
    torch.testing.assert_close(areas[1], areas[0], atol=0.03, rtol=0)
    assert 0.35 < areas[1][2] < 0.6  # median area fraction of U(0.08, 1) with edge losses


# --------------------------------------------------------- per-sample independence
def test_batched_parameters_are_per_sample():
    same = _structured(1).expand(N, 3, 32, 32).contiguous()
    views = _batched(same, _spec(1, jitter_p=1.0))  # (boxes are integers and can repeat)
    assert torch.unique(views.flatten(1), dim=0).shape[0] == N  # all views differ
    flips = _batched(_ramps(N), _spec(0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0,
                                      gray_p=0.0, blur_p=0.0))
    flipped = (flips[:, 0, :, 0] > flips[:, 0, :, -1]).all(1).float().mean().item()
    assert abs(flipped - 0.5) < 0.035
    gray = _is_gray(_batched(_structured(N, seed=6), _spec(0))).float().mean().item()
    assert abs(gray - 0.2) < 0.035


def test_jitter_order_is_a_per_sample_permutation():
    order = A._jitter_order(lambda *s: torch.rand(*s, generator=_gen(7)), N)
    assert (order.sort(1).values == torch.arange(4)).all()
    assert len({tuple(r) for r in order.tolist()}) == 24  # all 24 orders occur within one batch
    first = torch.bincount(order[:, 0], minlength=4).float() / N
    assert (first - 0.25).abs().max() < 0.04


def test_jitter_order_changes_the_result():
    """Brightness then contrast != contrast then brightness: the batched jitter follows
    each sample's own order (checked against applying the ops in that order)."""
    x = _structured(64, seed=8).float() / 255
    rng = _gen(9)
    rand = lambda *s: torch.rand(*s, generator=rng)  # noqa: E731
    state = rng.get_state()
    out = A._jitter(x, (0.4, 0.4, 0.2, 0.1), rand)
    rng.set_state(state)
    factors = [A._uniform(rand, lo, hi, 64) for lo, hi in ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))]
    order = A._jitter_order(rand, 64)
    ops = (_brightness, _contrast, _saturation, A._hue)
    for i in range(64):
        want = x[i:i + 1]
        for op in order[i].tolist():
            want = ops[op](want, factors[op][i:i + 1])
        torch.testing.assert_close(out[i:i + 1], want, atol=1e-6, rtol=0)


# --------------------------------------------------------- determinism and resume
def test_batched_view_is_deterministic_given_generator():
    x = _structured(16)
    torch.testing.assert_close(_batched(x, _spec(1), seed=3), _batched(x, _spec(1), seed=3), atol=0, rtol=0)
    assert not torch.equal(_batched(x, _spec(1), seed=3), _batched(x, _spec(1), seed=4))


def test_view_maker_resume_reproduces_next_batch():
    x = _structured(16)
    vm = A.ViewMaker(AUG, 2, 24, ZERO, ONE, "cpu", seed=0)
    vm(x)
    sd = dict(vm.state_dict())
    want = vm(x)
    fresh = A.ViewMaker(AUG, 2, 24, ZERO, ONE, "cpu", seed=0)  # a restarted process, same rank
    fresh.load_state_dict(sd)
    got = fresh(x)
    assert len(got) == 2 and got[0].shape == (16, 3, 24, 24)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(got[0], got[1])


def test_view_maker_rank0_state_resumes_every_rank():
    """Under DDP only rank 0 writes the checkpoint; rank 1 must still continue its own stream."""
    x = _structured(8)
    ranks = [A.ViewMaker(AUG, 2, 24, ZERO, ONE, "cpu", seed=7 + 1000 * r) for r in (0, 1)]
    for _ in range(3):
        outs = [vm(x) for vm in ranks]
    assert not torch.equal(outs[0][0], outs[1][0])  # ranks draw different views
    sd = dict(ranks[0].state_dict())
    want = ranks[1](x)
    resumed = A.ViewMaker(AUG, 2, 24, ZERO, ONE, "cpu", seed=7 + 1000)
    resumed.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(resumed(x), want))


def test_view_maker_cpu_path_and_bad_path():
    vm = A.ViewMaker({**AUG, "path": "cpu"}, 4, 32, ZERO, ONE, "cpu", seed=0)
    ts = vm.cpu_transforms()
    assert len(ts) == 4 and isinstance(ts[0], T.Compose)
    views = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(vm(views), views))
    with pytest.raises(UserError, match="batched, cpu"):
        A.ViewMaker({**AUG, "path": "gpu"}, 2, 32, ZERO, ONE, "cpu", seed=0)


def test_multiview_dataset_is_order_independent():
    base = [(img, i % 3) for i, img in enumerate(_structured(6))]
    ds = A.MultiViewDataset(base, [A.cpu_view(32, s, ZERO, ONE) for s in A.view_specs(AUG, 2)], seed=5)
    torch.manual_seed(0)
    forward = [ds[i] for i in range(6)]
    after = torch.rand(3)
    backward = [ds[i] for i in reversed(range(6))][::-1]
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)  # the global RNG is left untouched
    for (va, ya), (vb, yb) in zip(forward, backward):
        assert ya == yb and len(va) == 2 and all(torch.equal(a, b) for a, b in zip(va, vb))
    assert not torch.equal(forward[0][0][0], forward[0][0][1])  # the two views differ
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0][0], forward[0][0][0])  # a new epoch draws new views


# ------------------------------------------------------------------ eval transforms
def test_eval_transform_cifar_centre_crop_28():
    x = _structured(5)
    t = A.eval_transform("cifar10", 32, ZERO, ONE)
    batch = t(x)
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.float32
    torch.testing.assert_close(t(x[2]), batch[2])
    framed = x.clone()
    framed[..., :2, :], framed[..., -2:, :], framed[..., :2], framed[..., -2:] = 0, 0, 0, 0
    torch.testing.assert_close(t(framed), batch, atol=0, rtol=0)  # only the central 28x28 is seen
    assert not torch.equal(t(framed[:, :, 4:28, 4:28]), batch[:, :, :24, :24])


@pytest.mark.parametrize("size", [32, 64, 96])  # the 28/32 crop at any training view size
def test_eval_transform_cifar_crops_28_of_the_source_then_resizes(size):
    """The CIFAR crop is 28/32 of the 32 x 32 source at every image_size, never padding (then resize)."""
    from PIL import Image
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's
    x = (_structured(5).float() / 2 + 64).round().to(torch.uint8)  # centre values in [64, 192]
    x[..., :2, :], x[..., -2:, :], x[..., :2], x[..., -2:] = 16, 16, 16, 16  # a 2-px border unlike the centre
    out = A.eval_transform("cifar10", size, mean, std)(x)
    assert out.shape == (5, 3, size, size)
    padding = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)  # where a zero-padded pixel lands
    assert (out - padding).abs().amin() > 0.5  # no pixel anywhere near the padding value
    crop = x[..., 2:30, 2:30]  # crop 28 of 32 ...
    ref = TF.resize(crop, [size, size], interpolation=T.InterpolationMode.BICUBIC, antialias=True)  # ... resize
    ref = (ref.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    pil = Image.fromarray(x[3].permute(1, 2, 0).numpy())
    torch.testing.assert_close(A.eval_transform("cifar10", size, mean, std)(pil), out[3], atol=1e-6, rtol=0)

@pytest.mark.parametrize("size", [32, 96])  # 96: RAFT App. B ("resized from 32x32 to 96x96")
def test_eval_transform_cifar_crop_1_resizes_the_whole_source(size):
    """crop = 1.0 (eval.crop; RAFT App. B, the authors' load_testset): no crop, the whole 32 x 32 image resized."""
    from PIL import Image
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    x = _structured(5)
    out = A.eval_transform("cifar10", size, mean, std, crop=1.0)(x)
    ref = TF.resize(x, [size, size], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    ref = (ref.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    if size == 32:  # a no-op resize: the image itself
        torch.testing.assert_close(A.eval_transform("cifar10", 32, ZERO, ONE, crop=1.0)(x), x.float() / 255)
    framed = x.clone()
    framed[..., :2, :] = 0  # the border is seen (the 28/32 crop would not see it)
    assert not torch.equal(A.eval_transform("cifar10", size, mean, std, crop=1.0)(framed), out)
    pil = Image.fromarray(x[3].permute(1, 2, 0).numpy())
    torch.testing.assert_close(A.eval_transform("cifar10", size, mean, std, crop=1.0)(pil), out[3], atol=1e-6, rtol=0)


def test_eval_crop_default_is_byol_mhe_28_of_32():
    from common.config import BASE
    assert BASE["eval"]["crop"] == A.CIFAR_EVAL_CROP == 28 / 32


def test_eval_transform_imagenet_and_default():
    from PIL import Image
    x = torch.randint(0, 256, (2, 3, 300, 400), dtype=torch.uint8, generator=_gen(0))
    t = A.eval_transform("imagenet", 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    batch = t(x)
    assert batch.shape == (2, 3, 224, 224)
    torch.testing.assert_close(t(x[1]), batch[1])
    assert t(Image.new("RGB", (400, 300))).shape == (3, 224, 224)
    assert A.eval_transform("imagenet100", 112, ZERO, ONE)(x).shape == (2, 3, 112, 112)
    y = _structured(3, size=96)
    assert A.eval_transform("stl10", 64, ZERO, ONE)(y).shape == (3, 3, 64, 64)
    torch.testing.assert_close(A.eval_transform("stl10", 96, ZERO, ONE)(y), y.float() / 255)  # no-op resize


def test_cpu_view_accepts_pil_and_tensor():
    from PIL import Image
    t = A.cpu_view(24, _spec(1), ZERO, ONE)
    img = _structured(1)[0]
    out_t, out_p = t(img), t(TF.to_pil_image(img))
    assert out_t.shape == out_p.shape == (3, 24, 24) and out_p.dtype == torch.float32
    assert isinstance(TF.to_pil_image(img), Image.Image)


# ---------------------------------------------------------------------------- device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_view_on_cuda_without_host_syncs():
    vm = A.ViewMaker(AUG, 2, 32, ZERO, ONE, "cuda", seed=0)
    x = _structured(64).cuda()
    vm(x)  # warm-up (cuDNN / kernel selection)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = vm(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert views[0].device.type == "cuda" and views[0].shape == (64, 3, 32, 32)
    cpu_vm = A.ViewMaker(AUG, 2, 32, ZERO, ONE, "cpu", seed=0)
    for a, b in zip(views, cpu_vm(x.cpu())):  # same statistics as on the CPU
        torch.testing.assert_close(a.mean().cpu(), b.mean(), atol=0.05, rtol=0)
