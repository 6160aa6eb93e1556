"""Every shipped config parses strictly with its script's defaults (catches typos in rarely-run paper configs)."""
import importlib
from pathlib import Path

import pytest

from common import config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/*/*.yaml"))


def _method(path):
    return path.stem if path.parent.name == "quickstart" else path.parent.name


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_parses(path):
    method = _method(path)
    module = "common.tools.baselines" if method == "baselines" else method  # the table's baselines (not a method)
    if not (ROOT / f"{module.replace('.', '/')}.py").exists():
        pytest.skip(f"{method}.py not written yet")
    mod = importlib.import_module(module)
    cfg = config._parse(["--config", str(path)], mod.DEFAULTS, getattr(mod, "CHOICES", None), method)
    if path.parent.name == "quickstart":  # quickstarts never download and run on the embedded data
        assert cfg.data.name in ("synthetic", "toy2d") and not cfg.data.download
