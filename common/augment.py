"""BYOL/SimCLR view augmentations: a per-image CPU path and a batched on-device path.

Pipeline (Grill et al. 2020, "BYOL", App. B; BYOL-MHE App. B.2), every probability and
strength read from the config section ``augment``:

1. random resized crop, scale U(0.08, 1), log-aspect-ratio U(log 3/4, log 4/3), bicubic;
2. horizontal flip, p = 0.5;
3. colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), applied with
   p = 0.8, its four ops in a random order drawn per image;
4. grayscale, p = 0.2 (luma 0.2989 R + 0.5870 G + 0.1140 B);
5. Gaussian blur, kernel 23 at 224 px (10% of the side, odd), sigma U(0.1, 2);
6. solarisation x -> x if x < 0.5 else 1 - x;
7. per-channel normalisation with the dataset's mean/std.

BYOL's views are asymmetric: view 1 blurs with p = 1.0 and never solarises, view 2 blurs
with p = 0.1 and solarises with p = 0.2.  ``blur_p`` / ``solarize_p`` are per-view lists;
view j uses entry j % len(list): two entries alternate the BYOL pair, one entry gives every view the same
values (MSBReg, Tab. 9: one value per augmentation, blur p 1.0 and solarisation p 0.2 on each of the K views).

Two implementations of the same distribution:

* ``cpu_view``: torchvision.transforms.v2, one image at a time (in DataLoader workers).
  Crop and flip run on uint8 (torchvision's fast bicubic, antialiased), the rest on
  float32 in [0, 1].
* ``batched_view``: one pass over a uint8 batch [B, C, H, W] on the training device, each
  sample with its own parameters, no host syncs, only ``generator`` as RNG.

and a third path made of the two halves, for data decoded from files (ImageNet): ``cpu_crop``
(crop + flip on uint8) in DataLoader workers, ``batched_photometric`` (steps 3-7) on the device
(``augment.path: hybrid``, see ``ViewMaker``).

They are kept in agreement by construction and by test: every op below follows the
torchvision kernel it replaces (same sampling rules, same formulas, clamping where
torchvision clamps), tests/test_augment.py compares each op with torchvision on fixed
parameters and compares output statistics of the two paths over thousands of views.
Known small differences: the CPU path rounds to uint8 after the crop and resizes with
PIL's cubic (a = -0.5) and antialiasing, the batched path with a = -0.75 and none
(antialiasing matters only where a crop is shrunk: never when the output size equals
the image size, as for CIFAR); at the edge of a crop box the batched path's bicubic taps read the true
neighbouring pixels where torchvision (crop, then resize) repeats the box's edge; and
the two paths draw different random numbers.
"""
import functools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from common.config import BASE, UserError

BICUBIC = T.InterpolationMode.BICUBIC
LUMA = (0.2989, 0.587, 0.114)  # torchvision's (ITU-R 601) grayscale weights


def blur_kernel_size(size: int) -> int:
    """BYOL: kernel 23 at 224 px, i.e. 10% of the side, made odd, at least 3."""
    return max(3, int(0.1 * size) | 1)


def view_specs(aug: Mapping, n_views: int) -> list[dict]:
    """One parameter dict per view; per-view lists (blur_p, solarize_p) are cycled."""
    def per_view(value, j):
        return float(value[j % len(value)] if isinstance(value, (list, tuple)) else value)

    return [dict(crop_scale=tuple(aug["crop_scale"]), crop_ratio=tuple(aug["crop_ratio"]),
                 flip_p=float(aug["flip_p"]), jitter=tuple(aug["jitter"]),
                 jitter_p=float(aug["jitter_p"]), gray_p=float(aug["gray_p"]),
                 blur_p=per_view(aug["blur_p"], j), blur_sigma=tuple(aug["blur_sigma"]),
                 solarize_p=per_view(aug["solarize_p"], j))
            for j in range(n_views)]


# ---------------------------------------------------------------------------- CPU path
def cpu_crop(size: int, spec: dict) -> list:
    """The geometric part for one image: random resized crop (bicubic, antialiased) and flip, on uint8."""
    return [T.ToImage(),
            T.RandomResizedCrop(size, scale=spec["crop_scale"], ratio=spec["crop_ratio"],
                                interpolation=BICUBIC, antialias=True),
            T.RandomHorizontalFlip(spec["flip_p"])]


def cpu_view(size: int, spec: dict, mean, std) -> T.Compose:
    """Per-image view transform: PIL image or uint8 CHW tensor -> normalised float32 CHW."""
    return T.Compose([
        *cpu_crop(size, spec),
        T.ToDtype(torch.float32, scale=True),
        T.RandomApply([T.ColorJitter(*spec["jitter"])], p=spec["jitter_p"]),
        T.RandomGrayscale(spec["gray_p"]),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(size), spec["blur_sigma"])],
                      p=spec["blur_p"]),
        T.RandomSolarize(0.5, p=spec["solarize_p"]),
        T.Normalize(list(mean), list(std)),
        T.ToPureTensor(),  # a plain tensor, not a tv_tensors.Image (torch.compile'd encoders need one)
    ])


# ------------------------------------------------------------------------ batched path
# Each op takes x float [B, C, H, W] in [0, 1] and per-sample parameters shaped [B, 1, 1, 1].
def _luma(x):
    return x if x.shape[1] == 1 else sum(w * x[:, c:c + 1] for c, w in enumerate(LUMA))


def _blend(x, other, factor):  # torchvision's _blend: clamp to [0, 1]
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _hue(x, shift):
    """True HSV hue rotation by ``shift`` turns: rgb -> (h, s, v), h += shift, -> rgb."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = v - torch.minimum(torch.minimum(r, g), b)  # = v * s
    c = torch.where(chroma > 0, chroma, 1)  # chroma 0: r = g = b, so h = (g - b) / 1 = 0
    h6 = torch.where(r == v, (g - b) / c, torch.where(g == v, (b - r) / c + 2, (r - g) / c + 4))
    h6 = h6 + 6 * shift[:, 0]  # hue in sixths of a turn
    # hsv -> rgb: channel n in (R, G, B) = (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 h) mod 6
    k = torch.stack([(h6 + n) % 6 for n in (5, 3, 1)], 1)
    return v[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def _uniform(rand, lo, hi, batch):
    return (lo + (hi - lo) * rand(batch)).view(batch, 1, 1, 1)


def _jitter_order(rand, batch):
    """A random permutation of the 4 jitter ops per sample, [B, 4] (argsort of uniforms)."""
    return rand(batch, 4).argsort(1)


def _jitter(x, strengths, rand):
    """ColorJitter with per-sample factors and per-sample op order, hue evaluated once.

    Brightness, contrast and saturation are one blend clamp(f x + (1 - f) m, 0, 1) with m = 0,
    the mean luma or the luma image (torchvision's formulas), so a "slot" applies, per sample,
    whichever of the three that sample's order puts there (f = 1 leaves x unchanged, exactly).
    Each sample runs the three in its order: those before its hue in slots 1-3 of a first pass
    (the others with f = 1), then hue, then those after hue in a second pass of three slots.
    tests/test_augment.py holds each blend, one at a time, to torchvision's kernel and this function to
    applying them in each sample's order.
    """
    batch = x.shape[0]
    b, c, s, h = strengths
    factors = torch.cat([_uniform(rand, max(0, 1 - v), 1 + v, batch) for v in (b, c, s)], 1)[:, :, 0, 0]
    shift = _uniform(rand, -h, h, batch)
    order = _jitter_order(rand, batch)  # order[i, q]: op at slot q (0 b, 1 c, 2 s, 3 hue)
    hue_slot = (order == 3).int().argmax(1, keepdim=True)
    slots = (order == 3).int().argsort(dim=1, stable=True)[:, :3]  # the three blend ops' slots, in order
    kind = order.gather(1, slots)  # [B, 3]: which blend op runs r-th
    f = factors.gather(1, kind)

    def blend_slot(x, r, active):
        k = kind[:, r].view(batch, 1, 1, 1)
        luma = _luma(x)
        m = torch.where(k == 0, 0.0, torch.where(k == 1, luma.mean((1, 2, 3), keepdim=True), luma))
        return _blend(x, m, torch.where(active[:, r], f[:, r], 1.0).view(batch, 1, 1, 1))

    before, after = slots < hue_slot, slots > hue_slot
    for r in range(3):  # blend ops before hue
        x = blend_slot(x, r, before)
    x = _hue(x, shift)
    for r in range(3):  # blend ops after hue
        x = blend_slot(x, r, after)
    return x


def _gaussian_blur(x, kernel_size, sigma):
    """Separable Gaussian blur with per-sample sigma [B]: one grouped conv per axis,
    reflect padding and kernel exp(-t^2 / 2 sigma^2) normalised, as torchvision."""
    B, C, H, W = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2
    g = torch.exp(-0.5 * (t / sigma.view(B, 1)) ** 2)
    g = (g / g.sum(1, keepdim=True))[:, None].expand(B, C, kernel_size).reshape(B * C, kernel_size)
    y = F.pad(x.reshape(1, B * C, H, W), [kernel_size // 2] * 4, mode="reflect")
    y = F.conv2d(y, g.view(B * C, 1, 1, kernel_size), groups=B * C)
    y = F.conv2d(y, g.view(B * C, 1, kernel_size, 1), groups=B * C)
    return y.view(B, C, H, W)


def _sample_boxes(rand, batch, height, width, scale, ratio, trials=10):
    """RandomResizedCrop's box sampler, vectorised: ``trials`` candidates per sample, the
    first that fits wins; none fits -> centre crop at the clamped aspect ratio."""
    area = height * width * (scale[0] + (scale[1] - scale[0]) * rand(batch, trials))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * rand(batch, trials))
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # first fitting candidate (0 if none)
    found = fits.any(1)
    in_ratio = width / height  # fallback, as torchvision (plain Python: no sync)
    fw = width if in_ratio <= max(ratio) else round(height * max(ratio))
    fh = height if in_ratio >= min(ratio) else round(width / min(ratio))
    w = torch.where(found, w.gather(1, first)[:, 0], fw)
    h = torch.where(found, h.gather(1, first)[:, 0], fh)
    top = torch.minimum((rand(batch) * (height - h + 1)).floor(), height - h)
    left = torch.minimum((rand(batch) * (width - w + 1)).floor(), width - w)
    top = torch.where(found, top, (height - fh) // 2)
    left = torch.where(found, left, (width - fw) // 2)
    return top, left, h, w


def _resized_crop(x, top, left, h, w, flip, size):
    """Crop box (per sample) + optional horizontal flip + bicubic resize to size x size in
    one grid_sample: boxes differ per sample, so no batched crop op exists; an affine
    grid per sample does all three at once. grid_sample, not torchvision.ops.roi_align:
    roi_align only interpolates bilinearly (averaging sample points per bin) and cannot
    mirror, where BYOL's crop is bicubic and the flip comes free with a negative x scale.
    Bicubic to match the CPU path's crop: half-pixel centres and a replicated image border
    as torch's resize (cubic a = -0.75, where the CPU path's antialiased resize uses PIL's
    a = -0.5)."""
    B, C, H, W = x.shape
    sx = torch.where(flip, -w / W, w / W)  # flip = mirror the x axis of the output
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * left + w) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [B, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)


def _apply_with_p(x, p, op, rand):
    """x -> op(x) for a random subset of samples, each independently with probability p."""
    if p <= 0:
        return x
    return torch.where(rand(x.shape[0]).view(-1, 1, 1, 1) < p, op(x), x)


def batched_view(x: torch.Tensor, size: int, spec: dict, mean, std,
                 generator=None) -> torch.Tensor:
    """uint8 [B, C, H, W] on any device -> normalised float32 [B, C, size, size] there."""
    rand = functools.partial(torch.rand, generator=generator, device=x.device)
    B, C, H, W = x.shape
    x = TF.to_dtype(x, torch.float32, scale=True)
    box = _sample_boxes(rand, B, H, W, spec["crop_scale"], spec["crop_ratio"])
    x = _resized_crop(x, *box, rand(B) < spec["flip_p"], size).clamp(0, 1)
    return batched_photometric(x, spec, mean, std, generator)


def batched_photometric(x: torch.Tensor, spec: dict, mean, std, generator=None) -> torch.Tensor:
    """The photometric part of ``batched_view``: float [B, C, S, S] in [0, 1] -> jitter, grayscale,
    blur, solarise (each per sample) and normalisation. Alone it serves ``augment.path: hybrid``."""
    rand = functools.partial(torch.rand, generator=generator, device=x.device)
    B, size = x.shape[0], x.shape[-1]
    x = _apply_with_p(x, spec["jitter_p"], lambda y: _jitter(y, spec["jitter"], rand), rand)
    x = _apply_with_p(x, spec["gray_p"], lambda y: _luma(y).expand_as(y), rand)
    lo, hi = spec["blur_sigma"]
    x = _apply_with_p(x, spec["blur_p"], lambda y: _gaussian_blur(
        y, blur_kernel_size(size), lo + (hi - lo) * rand(B)), rand)
    x = _apply_with_p(x, spec["solarize_p"], lambda y: torch.where(y >= 0.5, 1 - y, y), rand)
    mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
                 for v in (mean, std))
    return (x - mean) / std


# ------------------------------------------------------------------- data-side helpers
class MultiViewDataset(torch.utils.data.Dataset):
    """``base[i] = (img, label)`` -> ``([t(img) for t in transforms], label)``.

    Torch's RNG is seeded from (seed, epoch, i) inside ``__getitem__`` (and restored
    afterwards), so item i of an epoch is the same whatever the worker count or order;
    call ``set_epoch`` every epoch (not seen by ``persistent_workers``)."""

    def __init__(self, base, transforms: list, seed: int):
        self.base, self.transforms, self.seed, self.epoch = base, list(transforms), seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**63)
            return [t(img) for t in self.transforms], label


class ViewMaker:
    """The K training views of a batch, on one of three paths (``aug["path"]``):

    * ``batched``: a uint8 batch -> ``batched_view`` on the device (in-memory datasets);
    * ``cpu``: the K views were made per image by ``cpu_view`` in DataLoader workers; only moved here;
    * ``hybrid``: the workers decoded, cropped and flipped (``cpu_crop``, uint8, so a batch of JPEGs of
      any size becomes K uint8 batches); jitter, grayscale, blur, solarise and normalisation run here,
      batched (``batched_photometric``). For ImageNet: the workers do only decoding and geometry.

    The batched path reseeds its generator at every call from (``seed``, number of calls so far), so
    its state is one integer that is the same on every rank (the rank is in ``seed``): rank 0's
    checkpoint resumes every rank exactly under DDP.
    """

    def __init__(self, aug: Mapping, n_views: int, size: int, mean, std, device, seed: int):
        self.path = aug["path"]
        if self.path not in ("batched", "cpu", "hybrid"):
            raise UserError(f"augment.path: got {self.path!r}; valid choices: batched, cpu, hybrid")
        self.specs, self.size, self.device = view_specs(aug, n_views), size, torch.device(device)
        self.mean, self.std = list(mean), list(std)
        # device copies made once here, so that batched_view never copies from the host
        self._mean, self._std = (torch.tensor(v, device=self.device) for v in (mean, std))
        self.generator = torch.Generator(device=self.device)
        self.seed, self.calls = seed, 0

    def __call__(self, batch):
        if self.path == "cpu":  # list of K float batches made by cpu_transforms()
            return [v.to(self.device, non_blocking=True) for v in batch]
        self.generator.manual_seed((self.seed * 1_000_003 + self.calls) % 2**63)  # host-side, no sync
        self.calls += 1
        if self.path == "hybrid":  # list of K uint8 crops made by cpu_transforms()
            return [batched_photometric(TF.to_dtype(v.to(self.device, non_blocking=True), torch.float32, scale=True),
                                        s, self._mean, self._std, self.generator) for v, s in zip(batch, self.specs)]
        x = batch.to(self.device, non_blocking=True)
        return [batched_view(x, self.size, s, self._mean, self._std, self.generator)
                for s in self.specs]

    def cpu_transforms(self) -> list:
        """The per-image transforms the DataLoader workers run (cpu: whole views; hybrid: crop + flip)."""
        if self.path == "hybrid":
            return [T.Compose([*cpu_crop(self.size, s), T.ToPureTensor()]) for s in self.specs]
        return [cpu_view(self.size, s, self.mean, self.std) for s in self.specs]

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, sd: dict):
        self.calls = int(sd["calls"])


# Evaluation geometry, per dataset (``eval_transform``; ``size`` = ``data.image_size``, the training view size):
#   cifar10, cifar100      centre crop ``crop`` (config ``eval.crop``) of the *source* side, then resize to
#                          size x size. The crop follows the method's paper: BYOL-MHE App. B.2, 28/32 ("center
#                          cropped at 28 x 28 then resized to 32 x 32"; the default of every method but RAFT);
#                          RAFT App. B, 1.0 ("Each image is resized from 32 x 32 to 96 x 96"; the authors'
#                          load_testset: ToTensor and Normalize, no crop), i.e. the whole 32 x 32 image resized
#   imagenet, imagenet100  resize the shorter side to 256/224 x size, then centre crop size x size (App. B.2 at 224)
#   folder                 resize the shorter side to size, then centre crop size x size (no-op at size x size)
#   any other dataset      resize to size x size (no-op when the image already has that size)
# Every crop lies inside the source image: the evaluation never sees padding.
CIFAR_EVAL_CROP = BASE["eval"]["crop"]  # the default fraction of the source side kept by the CIFAR centre crop


def eval_transform(name: str, size: int, mean, std, crop: float = CIFAR_EVAL_CROP) -> T.Compose:
    """Deterministic evaluation transform for one image (PIL / uint8 CHW) or a uint8 batch (table above);
    ``crop``: CIFAR's centre-crop fraction (``eval.crop``; 1.0: no crop)."""
    if name in ("imagenet", "imagenet100"):
        geometry = [T.Resize(round(size * 256 / 224), interpolation=BICUBIC, antialias=True),
                    T.CenterCrop(size)]
    elif name in ("cifar10", "cifar100"):
        geometry = [*([T.CenterCrop(round(32 * crop))] if crop < 1 else []),  # of the 32 x 32 source
                    T.Resize((size, size), interpolation=BICUBIC, antialias=True)]
    elif name == "folder":
        geometry = [T.Resize(size, interpolation=BICUBIC, antialias=True), T.CenterCrop(size)]
    else:
        geometry = [T.Resize((size, size), interpolation=BICUBIC, antialias=True)]
    return T.Compose([T.ToImage(), *geometry, T.ToDtype(torch.float32, scale=True),
                      T.Normalize(list(mean), list(std)), T.ToPureTensor()])
