"""common.benchmark end to end with tiny arguments: every line printed, every ratio positive."""
import re

import torch

from common import benchmark


def test_benchmark_prints_positive_ratios(capsys):
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
    assert all(r > 0 for r in ratios.values()), ratios
    k8 = [line for line in lines if line.startswith("(a) augmentation, 8 MSBReg views")]
    assert len(k8) == 1 and float(re.search(r"K=8 costs ([0-9.]+)x the per-image K=2 time$", k8[0])[1]) > 0, lines
    target = [line.split() for line in lines if line.startswith("    ")]  # EMA target lines under (b)
    assert {t[0] for t in target} == {"byol_uniform", "byol_mhe", "msbreg", "raft"} and len(target) == 4, lines
    assert all(t[-2] == "ratio" and float(t[-1].rstrip("x")) > 0 for t in target), lines
    for line in lines:  # the times and rates in each line parse and are positive too
        if line.startswith("("):
            numbers = [float(x.replace(",", "")) for x in re.findall(r"([0-9][0-9,]*\.?[0-9]*) (?:ms|s|img/s)\b", line)]
            assert len(numbers) == 2 and all(x > 0 for x in numbers), line
