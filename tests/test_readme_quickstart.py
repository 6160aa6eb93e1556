"""(slow) The README's quickstart rows against the quickstarts, run as the README writes them; each run also checks
that its method learns.

A band row reads ``kNN A → B ± s, linear C ± t``: A the random-init encoder's kNN of the command as written (seed 0),
B ± s and C ± t the mean ± sample std of the final kNN and the linear top-1 over the runs of its method's
``configs/<method>/README.md``: 3 seeds on one CPU's own kernels ("own"); 2 seeds on a second kernel set ("second",
``ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2``, as in .ci/run); seed 0 on a
third ("avx2", ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``). Another CPU's kernels move a short run's end
point as another seed does, so a user's run lands in the band, not on B: within max(3 s, 1.5) of B and max(3 t, 1.5)
of C; A, one forward of fixed weights, within 0.5.
"""
import re
import statistics

import pytest

from scriptrun import ROOT, Script

METHODS = ("byol_uniform", "byol_mhe", "msbreg", "raft", "decorr_nostopgrad", "center_penalty")
# Bands wider than the bar (issue #33 open): kNN std above 2.0, so 3 s is more than 5 points
WIDE = {"byol_uniform": "issue #33: byol_uniform's quickstart kNN std is 3.0 > 2.0 (its avx2 run ended at 42.3)"}
# Bands within it where 3 s or 3 t is still more than 5 points: a 5-point edit of that number is not caught
LOOSE = {"decorr_nostopgrad": "issue #33: Decorr's linear std 2.1: 3 t = 6.3 > 5 points",
         "center_penalty": "issue #33: the centre penalty's kNN std 2.0: 3 s = 6.0 > 5 points"}
FEATURE_STD_FLOOR = 0.02  # mean per-dim std of l2-normalised encoder features: ~1/√dim spread, ~0 collapsed
ROW = re.compile(r"kNN ([\d.]+) → ([\d.]+) ± ([\d.]+), linear ([\d.]+) ± ([\d.]+)")
# The three quickstarts that took longest in the slow suite here (byol_uniform, msbreg and decorr_nostopgrad took
# about 3 minutes each): `pytest -m slow` runs them, CI (.ci/run) leaves them out for its time
LONG = ("byol_mhe", "raft", "center_penalty")


def command(method):
    return f"python {method}.py --config configs/quickstart/{method}.yaml"


def readme_row(method, text=None):
    """{knn_init, knn200, knn200_std, linear_top1, linear_top1_std} of the README Results row of ``method``'s
    quickstart."""
    text = text if text is not None else (ROOT / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(f"| {method} |") and f"`{command(method)}`" in line]
    assert len(rows) == 1, f"one README row runs `{command(method)}`: {rows}"
    m = ROW.search(rows[0])
    assert m, f"the row should read 'kNN A → B ± s, linear C ± t': {rows[0]}"
    return dict(zip(("knn_init", "knn200", "knn200_std", "linear_top1", "linear_top1_std"), map(float, m.groups())))


def runs_table(method):
    """The rows of ``configs/<method>/README.md``'s quickstart runs table: (kernels, seed, kNN init, kNN, linear)."""
    text = (ROOT / "configs" / method / "README.md").read_text()
    block = text.split("<!-- quickstart runs -->", 1)[1].split("<!-- end of the quickstart runs -->", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
            if line.startswith("|")][2:]
    return [(r[0], int(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in rows]


def band_errors(got, row):
    """What is off between a run's summary ``got`` and a README ``row``: {key: (ours, README, tolerance)}."""
    tol = {"knn_init": 0.5, "knn200": max(3 * row["knn200_std"], 1.5),
           "linear_top1": max(3 * row["linear_top1_std"], 1.5)}
    return {k: (round(got[k], 1), row[k], t) for k, t in tol.items() if abs(got[k] - row[k]) > t}


def marked(methods, marks):
    """``methods`` as parameters, each one in ``marks`` ({method: mark}) carrying its mark."""
    return [pytest.param(m, marks=marks[m]) if m in marks else m for m in methods]


def wide(methods, wide=WIDE):
    return marked(methods, {m: pytest.mark.xfail(strict=True, reason=r) for m, r in wide.items()})


@pytest.mark.parametrize("method", METHODS)
def test_readme_band_is_the_mean_and_std_of_the_runs_table(method):
    """The row's band is its runs table's (3 seeds on one kernel set, 2 on the second, 1 on the third), every run
    15 or more kNN points above its random-init encoder; A is seed 0's on the first set."""
    row, runs = readme_row(method), runs_table(method)
    assert sorted(r[:2] for r in runs) == [("avx2", 0), ("own", 0), ("own", 1), ("own", 2), ("second", 0),
                                           ("second", 1)], runs
    for i, key in ((3, "knn200"), (4, "linear_top1")):
        values = [r[i] for r in runs]
        assert round(statistics.mean(values), 1) == row[key], (key, values, row)
        assert round(statistics.stdev(values), 1) == row[f"{key}_std"], (key, values, row)
    assert all(r[3] >= r[2] + 15 for r in runs), runs
    assert row["knn_init"] == next(r[2] for r in runs if r[:2] == ("own", 0))


@pytest.mark.parametrize("method", wide(METHODS))
def test_each_band_is_at_most_2_knn_points_wide(method):
    assert readme_row(method)["knn200_std"] <= 2.0, readme_row(method)


@pytest.mark.parametrize("method", wide(METHODS, {**WIDE, **LOOSE}))
def test_a_row_edited_by_5_points_is_caught(method):
    """The check below fails on a stale row: each of the three numbers moved by 5 points is out of its band."""
    row = readme_row(method)
    got = {k: row[k] for k in ("knn_init", "knn200", "linear_top1")}
    assert not band_errors(got, row)
    for k in got:
        assert k in band_errors({**got, k: got[k] + 5}, row), (method, k)


@pytest.mark.slow
@pytest.mark.parametrize("method", marked(METHODS, {m: pytest.mark.long_quickstart for m in LONG}))
def test_quickstart_lands_in_its_readme_band_and_learns(tmp_path, method):
    """The command as the README writes it (2 threads): its numbers within the row's band, and it learns."""
    S = Script(method, [])
    S.run(tmp_path, name="quickstart", tiny=False, threads="2", timeout=1800)
    s = S.summary(tmp_path, "quickstart")
    off = band_errors(s, readme_row(method))
    assert not off, f"(ours, README, tolerance) out of the band: {off}; re-measure with `{command(method)}`"
    assert s["knn200"] >= s["knn_init"] + 15, s
    assert s["feature_std"] > FEATURE_STD_FLOOR, s
    if method == "decorr_nostopgrad":  # its own collapse test: std of l2-normalised outputs x √dim above 0.1
        assert not s["collapsed"] and s["feature_std_rel"] > 0.1 and s["proj_std_rel"] > 0.1, s
    if method == "center_penalty":  # collapse raises ||s|| of the outputs towards 1 (CenterVector §2.1)
        assert s["s_norm_test"] < 0.5, s
