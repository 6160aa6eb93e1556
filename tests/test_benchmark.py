"""common.tools.benchmark end to end with tiny arguments: every line printed, each ratio the quotient of its line's
two timings in the direction the line states (slow over fast, full over bare)."""
import re

import pytest
import torch

from common.tools import benchmark


@pytest.mark.slow  # times the six scripts (13 s); the --dry GPU check and --mhe stay in the default suite
def test_benchmark_prints_each_ratio_of_its_two_timings(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark.main(["--device", "cpu", "--size", "16", "--batch", "16", "--width", "4", "--repeats", "1",
                        "--warmup", "1", "--epoch-images", "32"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    ratios = {}
    for line in lines:
        m = re.match(r"\((a|b|c)\) (\S+).*\| ratio ([0-9.]+)x$", line)
        if m:
            ratios[(m[1], m[2])] = float(m[3])
    assert sorted(k for k, _ in ratios) == ["a", *["b"] * len(benchmark.SCRIPTS), "c"], lines
    assert {name for k, name in ratios if k == "b"} == set(benchmark.SCRIPTS)
    k8 = [line for line in lines if line.startswith("(a) augmentation, 8 MSBReg views")]
    assert len(k8) == 1 and float(re.search(r"K=8 costs ([0-9.]+)x the per-image K=2 time$", k8[0])[1]) > 0, lines
    target = [line.split() for line in lines if line.startswith("    ")]  # EMA target lines under (b)
    assert {t[0] for t in target} == {"byol_uniform", "byol_mhe", "msbreg", "raft"} and len(target) == 4, lines
    assert all(t[-2] == "ratio" and float(t[-1].rstrip("x")) > 0 for t in target), lines
    signal = [line for line in lines if line.startswith("(e) ")]  # the collapse signal's share of each full step
    assert [line.split()[1] for line in signal] == list(benchmark.SCRIPTS), lines
    for line in signal:
        t, step = (float(x) for x in re.findall(r"([0-9.]+) ms\b", line))
        share = float(re.search(r"\| share ([0-9.]+)%$", line)[1])
        assert t > 0 and share == pytest.approx(100 * t / step, rel=0.1, abs=0.002), line
    for line in lines:  # each ratio is its line's quotient: (a) rates fast / slow, (b) full / bare, (c) slow / fast
        if line.startswith("(") and not line.startswith("(e) "):
            numbers = [float(x.replace(",", "")) for x in re.findall(r"([0-9][0-9,]*\.?[0-9]*) (?:ms|s|img/s)\b", line)]
            assert len(numbers) == 2 and all(x > 0 for x in numbers), line
            a, b = numbers if line.startswith(("(a)", "(b)")) else numbers[::-1]
            ratio = float(re.search(r"\| ratio ([0-9.]+)x", line)[1])
            assert ratio == pytest.approx(a / b, rel=0.15, abs=0.02), line  # (printed times are rounded)


def test_mhe_cost_times_the_scripts_step_with_and_without_the_energy(capsys):
    """(d): the step is byol_mhe_loss itself; with MHE the regularised layers get another gradient."""
    from common.config import Cfg, parse

    import byol_mhe as bm
    cfg = bm.check_mhe(parse(["--set", "model.width=8", "model.proj_hidden=64", "model.proj_dim=16",
                              "model.pred_hidden=64", "mhe.layers=[projector]"], bm.DEFAULTS, method="byol_mhe"))
    torch.manual_seed(0)
    online = bm.Online(cfg.model)
    target = torch.nn.Sequential(online.f, online.g)
    layers = bm.mhe_layers(online, ["projector"])
    x = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    w = layers["projector.0"].weight
    g0 = torch.autograd.grad(bm.byol_mhe_loss(online, target, *x, layers, Cfg({**cfg.mhe, "weight": 0.0}))[0], w)[0]
    g1 = torch.autograd.grad(bm.byol_mhe_loss(online, target, *x, layers, cfg.mhe)[0], w)[0]
    assert not torch.allclose(g0, g1)
    benchmark.main(["--mhe", "--device", "cpu", "--size", "16", "--batch", "8", "--width", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    times = dict(re.findall(r"^    (.+?)\s+([0-9.]+)(?: s)?$", out, re.M))
    assert {"byol", "+mhe", "mhe", "ratio", "mhe projector.0 (4096, 64)",
            "mhe predictor.0 (4096, 256)"} <= set(times), out
    assert all(float(v) > 0 for v in times.values()), out


def test_gpu_check_dry_runs_every_part_and_writes_its_json(tmp_path, capsys):
    """``--gpu-check --dry`` (the GPU session's one command, on the CPU at toy sizes): the cuda tests run (a subset,
    on the CPU) and pass, the BYOL epoch and step rates are measured, and each batch search meets the pretend
    out-of-memory limit and bisects to it exactly; one line per result, and the JSON holds the same numbers."""
    import json

    from common.tools import gpu_check
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark.main(["--gpu-check", "--dry", "--out", str(tmp_path / "g.json")])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    res = json.loads((tmp_path / "g.json").read_text())
    assert {"device", "torch", "dry", "cuda_tests", "byol_epoch", "largest_batch", "seconds"} <= set(res)
    c = res["cuda_tests"]
    assert c["passed"] >= 2 and c["failed"] == c["errors"] == 0 and c["rc"] == 0, c
    e = res["byol_epoch"]
    assert all(e[k] > 0 for k in ("images_per_s", "step_images_per_s", "encoder_only_images_per_s",
                                  "step_over_encoder")), e
    assert e["step_over_encoder"] == pytest.approx(e["encoder_only_images_per_s"] / e["step_images_per_s"])
    for arch in ("resnet18", "resnet50"):
        r = res["largest_batch"][arch]
        assert r["batch"] == gpu_check.DRY_MEMORY_LIMIT and r["exact"], r
        assert set(r["peak_gib"]) == {"2", "4", "5"}  # doubled to 8 (too many), bisected: 6 (too many), 5
        assert sum(line.startswith(f"largest batch {arch}: {r['batch']} images") for line in lines) == 1, lines
    assert [line.split(":")[0] for line in lines[1:-1]] == ["cuda tests", "byol epoch", "largest batch resnet18",
                                                           "largest batch resnet50"], lines
    assert f"{c['passed']} passed, 0 failed" in lines[1]


def test_largest_batch_search_doubles_then_bisects():
    from common.tools import gpu_check
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 300
    assert gpu_check.largest_batch(fits, 10 ** 6, float("inf")) == (300, True)
    assert tried[:9] == [2, 4, 8, 16, 32, 64, 128, 256, 512] and len(tried) == 9 + 8  # bisect 256..512: 8 tries
    assert gpu_check.largest_batch(lambda b: True, 100, float("inf")) == (64, False)  # the cap: at least 64
    assert gpu_check.largest_batch(lambda b: False, 100, float("inf")) == (0, True)  # not even 2
