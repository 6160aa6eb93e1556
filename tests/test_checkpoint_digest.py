"""A checkpoint's digest (common.checkpoint: the sha256 of its tensors' bytes, stored at save): a flipped bit inside
a tensor record, which unpickles fine, is one line naming the file and exit 2 at every load (a resume, the evaluate
and export commands); a checkpoint written before checkpoints carried a digest loads, with a note."""
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from common import checkpoint
from common.config import BASE, Cfg, UserError

from scriptrun import ROOT, Script, one_clear_line

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CORRUPT = ("checkpoint corrupt: the tensors' sha256 differs from the one stored at save (a flipped bit on disk or in "
           "transfer); use another checkpoint (checkpoints/) or re-run")
TINY = ["data.synthetic.train_size=64", "data.synthetic.test_size=32", "model.width=8", "model.proj_hidden=16",
        "model.proj_dim=8", "model.pred_hidden=16", "optim.batch_size=16", "optim.epochs=1", "optim.warmup_epochs=0",
        "eval.linear=none", "eval.knn_k=[5]", "log.progress=false", "data.workers=0"]
S = Script("byol_uniform", TINY)


def records(path):
    """{name: (offset of the bytes in the file, size)} of the tensor records (``<archive>/data/<N>``) of a checkpoint:
    torch.save's zip stores them uncompressed."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" in info.filename and info.filename.rsplit("/", 1)[1].isdigit() and info.file_size:
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def flip(path, record, n=256):
    """XOR ``n`` bytes in the middle of ``record`` with 0x01, as the issue did: every float stays finite."""
    offset, size = records(path)[record]
    n = min(n, size)
    start = offset + (size - n) // 2
    with open(path, "r+b") as f:
        f.seek(start)
        b = f.read(n)
        f.seek(start)
        f.write(bytes(x ^ 0x01 for x in b))


def tiny_checkpoint(path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpoint.save(checkpoint.snapshot(Cfg.wrap(BASE), {"step": 1}, "m", model=model, optimizer=opt,
                                        scaler=scaler), path)
    return model


def test_digest_is_stored_checked_and_removed_on_read(tmp_path):
    path = tmp_path / "last.pt"
    model = tiny_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert raw[checkpoint.DIGEST] == checkpoint.digest({k: v for k, v in raw.items() if k != checkpoint.DIGEST})
    state = checkpoint.load(path)
    assert checkpoint.DIGEST not in state and torch.equal(state["model"]["0.weight"], model[0].weight)
    assert checkpoint.digest(state) == checkpoint.digest(torch.load(path, weights_only=True, mmap=True))
    # the order of a dict's keys does not matter; a tensor's place, dtype and values do
    a = {"x": torch.ones(2), "y": [torch.zeros(3, dtype=torch.int64), {"z": torch.tensor(1.0)}]}
    assert checkpoint.digest(a) == checkpoint.digest({"y": a["y"], "x": a["x"]})
    for other in ({"x": torch.zeros(3, dtype=torch.int64), "y": [torch.ones(2), {"z": torch.tensor(1.0)}]},
                  {**a, "x": torch.ones(2, dtype=torch.float64)}, {**a, "x": torch.tensor([1.0, 1.0 + 2 ** -23])}):
        assert checkpoint.digest(other) != checkpoint.digest(a)


def test_a_flipped_byte_in_any_tensor_record_is_caught(tmp_path):
    """Every tensor record (weights, BN statistics and counters, momentum, RNG states), one byte XOR 0x01."""
    path = tmp_path / "last.pt"
    tiny_checkpoint(path)
    names = sorted(records(path))
    assert len(names) >= 8
    for name in names:
        bad = tmp_path / "bad.pt"
        shutil.copy(path, bad)
        flip(bad, name, n=1)
        torch.load(bad, weights_only=True)  # unpickles fine: torch reads no CRC
        with pytest.raises(UserError) as e:
            checkpoint.load(bad)
        assert str(e.value) == f"{bad.resolve()}: {CORRUPT}", name


def test_a_checkpoint_without_a_digest_loads_with_a_note(tmp_path, capsys):
    path = tmp_path / "old.pt"
    state = checkpoint.snapshot(Cfg.wrap(BASE), {"step": 1}, "m", model=torch.nn.Linear(2, 3))
    checkpoint.save(state, path, with_digest=False)
    assert checkpoint.DIGEST not in torch.load(path, weights_only=True)
    assert checkpoint.load(path)["counters"] == {"step": 1}
    assert checkpoint.load(path)["counters"] == {"step": 1}  # noted once
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"note: {path} has no digest"), out


def test_resume_evaluate_and_export_refuse_a_flipped_tensor(tmp_path):
    """The issue's reproduction on a real (tiny) run: 256 bytes XOR 0x01 in the largest of the first 20 tensor
    records of last.pt; resume=auto, evaluate and export: exit 2, one line naming the file, no traceback."""
    S.run(tmp_path, "checkpoint.stop_after_step=2", name="h1")
    ck = S.folder(tmp_path, "h1") / "checkpoints" / "last.pt"
    recs = records(ck)
    first = sorted(recs, key=lambda r: int(r.rsplit("/", 1)[1]))[:20]
    flip(ck, max(first, key=lambda r: recs[r][1]))
    before = ck.read_bytes()
    want = f"error: {ck.resolve()}: {CORRUPT}"
    assert one_clear_line(S.run(tmp_path, "resume=auto", name="h1", check=False)) == want
    for tool, *more in (("evaluate",), ("export", "--out", str(tmp_path / "b.pt"))):
        p = subprocess.run([sys.executable, "-m", f"common.tools.{tool}", str(S.folder(tmp_path, "h1")), *more],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert one_clear_line(p) == want, tool
    assert ck.read_bytes() == before and not (tmp_path / "b.pt").exists()
