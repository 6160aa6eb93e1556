"""Learning check (slow): the quickstart run of byol_uniform.py raises kNN clearly above the random-init
encoder on the embedded synthetic data, without collapse."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FEATURE_STD_FLOOR = 0.02  # mean per-dim std of l2-normalised 128-d encoder features: ~0.088 (=1/sqrt(128)) if
                          # spread evenly, 0 if collapsed


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    cmd = [sys.executable, "byol_uniform.py", "--config", "configs/quickstart/byol_uniform.yaml",
           "--set", f"out_dir={tmp_path}", "eval.every=0", "eval.linear=none"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "byol_uniform" / "byol_uniform" / "summary.json").read_text())
    print(f"kNN (k=200, T=0.1): random init {s['knn_init']:.1f}% -> trained {s['knn200']:.1f}%, "
          f"feature_std {s['feature_std']:.3f}, {s['wall_time_s']:.0f} s")
    assert s["knn200"] >= s["knn_init"] + 15
    assert s["feature_std"] > FEATURE_STD_FLOOR
