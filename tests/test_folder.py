"""data.name=folder: your own images in an ImageFolder layout, on tiny folders of PNGs this file writes; labelled
(val/ or a held-out part of train/), unlabelled (SSL only), any image size, mean/std computed and cached, one clear
line for each bad layout; end to end through byol_uniform.py."""
import json
import math
import os
import types

import pytest
import torch
from torchvision.transforms.v2.functional import to_pil_image

from common import data, evaluate, loaders
from common.augment import ViewMaker, eval_transform
from common.config import BASE, Cfg, UserError, merge, parse_overrides, resolve

import byol_uniform
from scriptrun import Script, one_clear_line

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def images(folder, n, size=(16, 16), seed=0):
    """``n`` random PNGs of ``size`` (h, w), or sizes cycling through a list, written into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sizes = size if isinstance(size, list) else [size]
    for i in range(n):
        x = torch.randint(0, 256, (3, *sizes[i % len(sizes)]), generator=g, dtype=torch.uint8)
        to_pil_image(x).save(folder / f"{i:02d}.png")


def labelled(root, classes=("cat", "dog"), n=8, val=0, size=(16, 16)):
    for k, c in enumerate(classes):
        images(root / "train" / c, n, size, seed=k)
        if val:
            images(root / "val" / c, val, size, seed=100 + k)
    return root


def cfg(root, *sets):
    sets = parse_overrides(["data.name=folder", f"data.root={root}", "data.image_size=16", "data.workers=0",
                            "eval.linear=fast", *sets])
    return resolve(merge(BASE, byol_uniform.DEFAULTS), [(sets, "from --set")])


# ------------------------------------------------------------------------------------------ the layouts
def test_labelled_with_val(tmp_path):
    root = labelled(tmp_path, classes=("cat", "dog", "emu"))
    images(root / "val" / "dog", 3)  # val/ may lack classes: its labels follow train/'s class names
    c = cfg(root)
    ssl, train, test = (data.load(c.data, s) for s in ("ssl", "train", "test"))
    assert data.num_classes(c.data) == 3 and len(ssl) == len(train) == 24 and len(test) == 3
    assert isinstance(ssl, data.TensorImages) and ssl.images.shape == (24, 3, 16, 16)  # one size: in memory
    assert train.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8  # cat, dog, emu
    assert test.labels.tolist() == [1, 1, 1] and isinstance(test, data.TensorImages)


def test_labelled_without_val_holds_out_part_of_every_class(tmp_path, capsys):
    c = cfg(labelled(tmp_path, n=8))
    ssl, train, test = (data.load(c.data, s) for s in ("ssl", "train", "test"))
    assert len(ssl) == len(train) == 14 and test.labels.tolist() == [0, 1]  # 10% of 8, at least 1 per class
    everything = data.load(cfg(tmp_path, "data.val_split=true").data, "ssl")
    assert len(everything) == 14
    held = {tuple(x.flatten()[:8].tolist()) for x in test.images}
    assert not held & {tuple(x.flatten()[:8].tolist()) for x in ssl.images}  # left out of SSL and the kNN bank
    assert "evaluating on a held-out 10% of every class" in capsys.readouterr().out


def test_unlabelled_trains_without_accuracies(tmp_path, capsys):
    images(tmp_path / "train", 12)
    c = cfg(tmp_path)
    ssl, test = data.load(c.data, "ssl"), data.load(c.data, "test")
    assert data.num_classes(c.data) == 0 and len(ssl) == 12 and set(ssl.labels.tolist()) == {-1}
    assert len(test) == 12  # the label-free diagnostics' sample (up to FOLDER_EVAL_SAMPLE)
    assert "unlabelled, SSL only; kNN and linear accuracy are off" in capsys.readouterr().out
    f = torch.randn(12, 4)
    assert all(math.isnan(v) for v in evaluate.knn_accuracies(f, test.labels, f, test.labels, (5, 20), num_classes=0)
               .values())
    ev = Cfg.wrap({"linear": "fast"})
    assert evaluate.final_linear_eval(None, {"num_classes": 0}, "cpu", types.SimpleNamespace(eval=ev)) == {}


def test_any_size_decoded_per_image_hybrid_and_cpu_paths(tmp_path):
    root = labelled(tmp_path, n=6, val=2, size=[(16, 20), (24, 18), (40, 33)])
    c = cfg(root, "optim.batch_size=4", "eval.knn_k=[2]")
    ssl = data.load(c.data, "ssl")
    assert isinstance(ssl, data.FileImages) and isinstance(data.load(c.data, "test"), data.FileImages)
    with pytest.raises(data.UserError, match=r"folder \(train/\) holds images of different sizes \(train/cat/00.png "
                                             r"20x16, train/cat/01.png 18x24\): set augment.path=hybrid"):
        loaders.train_loader(ssl, c, None, torch.device("cpu"))
    mean, std = data.stats(c.data)
    for path in ("hybrid", "cpu"):
        c.augment.path = path
        views = ViewMaker(c.augment, 2, 16, mean, std, "cpu", seed=0)
        loader, _ = loaders.train_loader(ssl, c, views, torch.device("cpu"))
        x1, x2 = views(next(iter(loader))[0])
        assert x1.shape == x2.shape == (4, 3, 16, 16) and x1.dtype == torch.float32
    ev = loaders.eval_loaders(c)
    x, y = next(iter(ev["test"]))
    assert x.shape == (4, 3, 16, 16) and ev["num_classes"] == 2  # shorter side to 16, centre square


def test_eval_transform_is_a_no_op_at_the_training_size_and_crops_the_centre_square():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(eval_transform("folder", 16, [0.0] * 3, [1.0] * 3)(x), x.float() / 255)
    assert eval_transform("folder", 16, [0.0] * 3, [1.0] * 3)(torch.zeros(3, 40, 64, dtype=torch.uint8)).shape == (
        3, 16, 16)


# ------------------------------------------------------------------------------------------ mean / std
def test_mean_std_computed_once_cached_and_overridden(tmp_path, monkeypatch, capsys):
    root = labelled(tmp_path)
    c = cfg(root)
    x = data.load(c.data, "ssl").images  # all 16 images (1 per class held out of ssl, not of the statistics)
    x = torch.cat([x, data.load(c.data, "test").images]).double().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = data.stats(c.data)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), x.mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), x.std(1, correction=0), atol=1e-4, rtol=0)
    with pytest.raises(ValueError):
        data.stats("folder")  # by name alone: no folder to read
    saved = json.loads((root / data.STATS_FILE).read_text())
    assert saved["mean"] == list(mean) and saved["images"] == 16
    saved["mean"] = [0.25, 0.5, 0.75]  # a later start reads the cache (a fresh process: no in-memory copy)
    (root / data.STATS_FILE).write_text(json.dumps(saved))
    monkeypatch.setattr(data, "_FOLDER_CACHE", {})
    assert data.stats(c.data)[0] == (0.25, 0.5, 0.75)
    images(root / "train" / "cat", 9, seed=5)  # the files changed: computed again
    monkeypatch.setattr(data, "_FOLDER_CACHE", {})
    assert data.stats(c.data)[0] != (0.25, 0.5, 0.75) and json.loads((root / data.STATS_FILE).read_text())["of"] == 17
    given = cfg(root, "data.mean=[0.5,0.5,0.5]", "data.std=[0.2]")
    assert data.stats(given.data) == ((0.5,) * 3, (0.2,) * 3)
    with pytest.raises(data.UserError, match="give both"):
        data.stats(cfg(root, "data.mean=[0.5,0.5,0.5]").data)
    with pytest.raises(data.UserError, match="data.mean/data.std are for data.name=folder"):
        data.load(merge(c.data, {"name": "synthetic", "mean": [0.5] * 3}), "ssl")


def test_mean_std_in_a_read_only_folder_say_how_to_skip_them(tmp_path, monkeypatch, capsys):
    root = labelled(tmp_path / "ro")
    monkeypatch.setattr(data.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    mean, std = data.stats(cfg(root).data)
    out = capsys.readouterr().out
    assert f"cannot cache them in {root}/{data.STATS_FILE} (Permission denied): --set data.mean=[" in out
    assert f"data.std=[{','.join(map(str, std))}] skips this" in out


# ------------------------------------------------------------------------------------------ bad layouts
def _bad(root, kind):
    if kind == "missing":
        os.makedirs(root)
    elif kind == "empty":
        os.makedirs(root / "train" / ".hidden")
    elif kind == "empty class":
        labelled(root)
        os.makedirs(root / "train" / "emu")
    elif kind == "not an image":
        labelled(root)
        (root / "train" / "dog" / "notes.txt").write_text("x")
    elif kind == "unreadable":
        labelled(root)
        (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    elif kind == "images and classes":
        labelled(root)
        images(root / "train", 1)
    elif kind == "val classes":
        labelled(root, val=2)
        images(root / "val" / "emu", 2)
    return root


BAD = {"missing": "no folder {root}/train; expected <data.root>/train/<class>/<image>",
       "empty": "{root}/train is empty; expected",
       "empty class": "the class folder {root}/train/emu holds no images",
       "not an image": "{root}/train/dog/notes.txt is not an image (expected only .jpg",
       "unreadable": "{root}/train/dog/broken.png is not a readable image",
       "images and classes": "{root}/train holds both class folders (cat/) and images (00.png)",
       "val classes": "{root}/val has class folders that train/ lacks (emu)"}


@pytest.mark.parametrize("kind", BAD)
def test_bad_layout_is_one_clear_error(tmp_path, kind):
    root = _bad(tmp_path / "d", kind)
    with pytest.raises(data.UserError) as e:
        c = cfg(root)
        [data.load(c.data, s) for s in ("ssl", "train", "test")]
    assert BAD[kind].format(root=root) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ end to end
TINY = ["data.name=folder", "data.image_size=16", "data.workers=0", "model.width=8", "model.proj_hidden=16",
        "model.proj_dim=8", "model.pred_hidden=16", "optim.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0",
        "eval.linear_epochs=2", "log.every=1", "eval.knn_k=[5]"]
S = Script("byol_uniform", TINY)


def test_byol_uniform_on_a_labelled_folder(tmp_path):
    root = labelled(tmp_path / "pngs", val=2)
    S.run(tmp_path, f"data.root={root}")
    s = S.summary(tmp_path, "r")
    assert s["steps"] == 2 and 0 <= s["knn5"] <= 100 and 0 <= s["linear_top1"] <= 100


def test_byol_uniform_on_an_unlabelled_folder(tmp_path):
    images(tmp_path / "pngs" / "train", 16)
    p = S.run(tmp_path, f"data.root={tmp_path / 'pngs'}")
    assert "unlabelled, SSL only" in p.stdout
    s = S.summary(tmp_path, "r")
    assert s["steps"] == 2 and math.isnan(s["knn5"]) and "linear_top1" not in s and "uniformity" in s


def test_byol_uniform_bad_layouts_stop_with_one_line(tmp_path):
    root = _bad(tmp_path / "d", "not an image")
    assert "notes.txt is not an image" in one_clear_line(S.run(tmp_path, f"data.root={root}", check=False))
    root = labelled(tmp_path / "mixed", size=[(16, 16), (20, 16)])
    err = one_clear_line(S.run(tmp_path, f"data.root={root}", name="m", check=False))
    assert "holds images of different sizes" in err and "set augment.path=hybrid" in err


def test_byol_uniform_on_a_folder_of_one_class_reports_no_accuracies(tmp_path):
    """One class: every kNN / linear prediction is right (100.0); evaluated as unlabelled instead, with a note."""
    root = labelled(tmp_path / "pngs", classes=("cat",), n=16, val=2)
    p = S.run(tmp_path, f"data.root={root}")
    assert p.stdout.count("has one class; evaluation needs two or more") == 1, p.stdout
    s = S.summary(tmp_path, "r")
    assert math.isnan(s["knn5"]) and "linear_top1" not in s and "uniformity" in s


def test_paper_probe_batch_larger_than_its_set_is_one_line(tmp_path):
    c = cfg(labelled(tmp_path, n=8, val=2), "eval.linear=paper", "eval.linear_batch_size=64", "device=cpu",
            "eval.knn_k=[5]")
    with pytest.raises(UserError) as e:
        loaders.eval_loaders(c)
    assert "eval.linear_batch_size=64 exceeds the 16 images" in str(e.value)
    assert "eval.linear_batch_size=16 or less" in str(e.value)
    loaders.eval_loaders(cfg(tmp_path, "eval.linear=paper", "eval.linear_batch_size=16", "device=cpu",
                             "eval.knn_k=[5]"))


# ------------------------------------------------------------------------------------------ a truncated image
def truncate(path):
    """Cut the file in half: the header (size) still reads, the pixels do not decode."""
    b = path.read_bytes()
    path.write_bytes(b[:len(b) // 2])
    return path


TRUNCATED = "is not a readable image (OSError: image file is truncated): replace or remove it"


def test_a_truncated_image_is_one_line_naming_it_when_opened_or_in_the_statistics_pass(tmp_path):
    """One size (decoded into memory when the folder is opened) or several (decoded per item: the statistics pass
    meets it first): a UserError naming the file, one line."""
    for name, size in (("one", (16, 16)), ("several", [(16, 20), (24, 18)])):
        bad = truncate(labelled(tmp_path / name, n=6, size=size) / "train" / "dog" / "03.png")
        c = cfg(tmp_path / name)
        with pytest.raises(UserError) as e:
            data.stats(c.data)
            data.load(c.data, "ssl")
        assert str(e.value) == f"data: {bad} {TRUNCATED}", name


def test_byol_uniform_stops_on_a_truncated_image_before_training(tmp_path):
    root = labelled(tmp_path / "pngs", val=2, size=[(16, 20), (24, 18)])
    bad = truncate(root / "train" / "cat" / "05.png")
    p = S.run(tmp_path, f"data.root={root}", "augment.path=hybrid", check=False)
    assert one_clear_line(p) == f"error: data: {bad} {TRUNCATED}"
    assert not S.folder(tmp_path, "r").exists()  # nothing trained: the run folder is removed


def test_a_truncated_image_met_by_a_dataloader_worker_is_the_same_one_line(tmp_path):
    """The statistics given (no statistics pass), images of several sizes decoded per item by a worker process:
    the worker's UserError, not its traceback."""
    root = labelled(tmp_path / "pngs", val=2, size=[(16, 20), (24, 18)])
    bad = truncate(root / "train" / "dog" / "02.png")
    p = S.run(tmp_path, f"data.root={root}", "augment.path=hybrid", "data.workers=1", "data.mean=[0.5,0.5,0.5]",
              "data.std=[0.25,0.25,0.25]", check=False)
    assert one_clear_line(p) == f"error: data: {bad} {TRUNCATED}"
