"""common/tools/plot.py: each paper's figure renders, as a PNG of the expected pixel size, from small recorded
runs (tests/plot_records: tiny real runs, config.yaml trimmed to the keys the plots read) or, for the
checkpoint-based figures, from a tiny run made here; a missing matplotlib is one line and exit status 2."""
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from common.tools import plot

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "tests" / "plot_records"
TINY = ["data.synthetic.train_size=128", "data.synthetic.test_size=64", "model.width=8", "model.proj_hidden=32",
        "model.proj_dim=16", "optim.batch_size=32", "optim.warmup_epochs=0",
        "eval.linear=none", "log.every=1000", "eval.knn_k=[20]"]


def png_size(path):
    """(width, height) from the PNG signature and IHDR chunk."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def panels(cols, rows=1):
    return round(plot.PANEL[0] * plot.DPI) * cols, round(plot.PANEL[1] * plot.DPI) * rows


def tiny_run(out_dir, script, *overrides):
    cmd = [sys.executable, f"{script}.py", "--config", f"configs/quickstart/{script}.yaml", "--set",
           f"out_dir={out_dir}", "name=tiny", *TINY, *overrides]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return out_dir / script / "tiny"


def test_runs_are_found_below_a_folder_and_told_apart_by_their_config():
    runs = plot.find_runs([RECORDS])
    assert {r.method for r in runs} == {"raft", "center_penalty", "decorr_nostopgrad", "msbreg"}
    raft = [r.label for r in runs if r.method == "raft"]  # the seed folders are runs, their parent is not
    assert raft == ["byol_mlpp", "raft_mlpp/seed0", "raft_mlpp/seed1", "raft_np"]
    assert len([r for r in runs if r.method == "msbreg"]) == 8


def test_toy_curves_are_mean_and_std_over_seeds():
    run = plot.read_run(RECORDS / "center_penalty" / "blobs_simsiam_no_predictor")
    by_seed = [[r["center_norm"] for r in run.records if r["seed"] == s and "center_norm" in r] for s in (0, 1)]
    epochs, mean, std = plot.series(run.records, "center_norm")
    assert epochs == [0, 1, 2, 3, 4]
    assert mean == pytest.approx([(a + b) / 2 for a, b in zip(*by_seed)])
    assert std == pytest.approx([abs(a - b) / 2 ** 0.5 for a, b in zip(*by_seed)])  # sample std (log.mean_std)
    image = plot.read_run(RECORDS / "center_penalty" / "quick")  # the random-init kNN is epoch 0 of the kNN curve
    assert plot.series(image.records, "knn200")[0] == [0, 1, 2, 3]


@pytest.mark.parametrize("method, expected", [
    ("raft", {"raft_fig4_align_uniform.png": panels(2)}),
    ("center_penalty", {"center_fig3_knn_s.png": panels(2)}),
    ("decorr_nostopgrad", {"decorr_fig1_corr.png": panels(1), "decorr_fig4_wp.png": panels(2)}),  # no W_p saved
    ("msbreg", {"msbreg_tab11.png": panels(2), "msbreg_tab12.png": panels(1)}),  # K = 2 and 4
])
def test_figures_from_recorded_metrics(tmp_path, method, expected):
    pytest.importorskip("matplotlib")
    written = plot.draw([RECORDS / method], tmp_path)
    assert {p.name: png_size(p) for p in written} == expected


def test_byol_s1_figure_from_a_tiny_checkpoint(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = tiny_run(tmp_path, "byol_uniform", "optim.epochs=1")
    theta, labels = plot.s1_features(plot.read_run(run_dir))
    assert theta.shape == labels.shape == (64,) and abs(theta).max() <= 3.1416
    plot.main([str(run_dir)])  # default output: RUN_DIR/figures
    assert png_size(run_dir / "figures" / "byol_fig2_s1.png") == panels(1, rows=2)


def test_decorr_wp_figures_from_a_tiny_run_and_chosen_epochs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = tiny_run(tmp_path, "decorr_nostopgrad", "optim.epochs=3", "eval.every=1", "loss.partitions=4")
    assert sorted(plot.wp_snapshots(plot.read_run(run_dir))) == [0, 1, 2, 3]  # at init and every epoch
    written = plot.draw([run_dir], tmp_path / "all")
    assert {p.name: png_size(p) for p in written} == {
        "decorr_fig1_corr.png": panels(1), "decorr_fig3_wp.png": panels(4), "decorr_fig4_wp.png": panels(2)}
    plot.main([str(run_dir), "--out", str(tmp_path / "two"), "--epochs", "1", "3"])
    assert str(tmp_path / "two" / "decorr_fig3_wp.png") in capsys.readouterr().out.splitlines()
    assert png_size(tmp_path / "two" / "decorr_fig3_wp.png") == panels(2)


def test_missing_matplotlib_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(SystemExit) as e:
        plot.main([str(RECORDS / "raft")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "pip install matplotlib" in err


def test_a_folder_without_runs_is_one_clear_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    assert e.value.code == 2 and "no run folder" in capsys.readouterr().err


def test_only_the_plot_module_imports_matplotlib():
    files = [*ROOT.glob("*.py"), *ROOT.glob("common/**/*.py"), *ROOT.glob("tests/*.py")]
    users = [p.relative_to(ROOT).as_posix() for p in files
             if p != Path(__file__).resolve() and "import matplotlib" in p.read_text()]
    assert users == ["common/tools/plot.py"]


@pytest.mark.parametrize("cols, title", [
    (1, "BYOL-MHE Fig. 2/3: eval-set features on $S^1$ (PCA to 2-D, l2-normalised)"),
    (1, "MSBReg Tab. 11: linear top-1 (%) over $(\\lambda_s, \\lambda_b)$ for every K of the sweep"),
    (2, "RAFT Fig. 4: " + ", ".join(f"runs/raft/seed_{i}_a_long_run_name" for i in range(6))),
])
def test_a_long_title_lies_inside_the_figure_above_the_panels(cols, title):
    pytest.importorskip("matplotlib")
    fig, axes = plot.figure(1, cols, title)
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        t, box = fig._suptitle.get_window_extent(r), fig.bbox
        assert box.x0 <= t.x0 and t.x1 <= box.x1 and box.y0 <= t.y0 and t.y1 <= box.y1, (t, box)
        assert all(t.y0 >= ax.get_tightbbox(r).y1 - 1 for ax in axes[0]), "the title overlaps a panel"
    finally:
        plot.pyplot().close(fig)
