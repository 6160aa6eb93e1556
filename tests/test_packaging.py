"""pyproject.toml: `pip install -e .` installs the package `common` with its data file, and states a torch range
(requirements.txt keeps the tested pin). The install itself was checked by hand in a fresh venv (network)."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_installs_common_with_its_data_and_a_torch_range():
    p = tomllib.loads((ROOT / "pyproject.toml").read_text())
    st = p["tool"]["setuptools"]
    # not configs/ or tests/: setuptools stops on several top-level packages
    assert st["packages"] == ["common", "common.tools"]
    for name in st["package-data"]["common"]:
        assert (ROOT / "common" / name).is_file(), name
    deps = {re.split(r"[<>=!~ ;]", d)[0]: d for d in p["project"]["dependencies"]}
    assert set(deps) == {"torch", "torchvision", "tqdm", "pyyaml"}
    assert ">=" in deps["torch"] and "==" not in deps["torch"] and "==" not in deps["torchvision"]
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    assert set(pins) == {"torch", "torchvision"}  # the tested builds
