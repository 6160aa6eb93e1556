"""The README and the six configs/<method>/README.md, read as a newcomer reads them (fast: nothing trains).

- README.md is short (<= 300 lines, <= 25 KB) and answers run / evaluate / export / multi-GPU / SLURM / own data in
  its first 120 lines.
- Every path under configs/ that the READMEs name exists.
- Every ``python <script>.py --config <file> [--set ...]`` they show (also after ``torchrun ...``) resolves with that
  script's own ``parse``, in this process, as the script does before it loads any data.
- Numbers agree: each number of the README's results table (paper and ours) is the one its method's
  configs/<method>/README.md gives. A quickstart row's band is the mean ± std of its method's runs table
  (tests/test_readme_quickstart.py checks that; a row not yet a band points there from its method's README), and
  the quickstart configs' comments hold no measured accuracy.
"""
import importlib
import re
import shlex
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

import pytest

from common.config import parse

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
METHODS = ("byol_uniform", "byol_mhe", "msbreg", "raft", "decorr_nostopgrad", "center_penalty")
DOCS = [README] + [ROOT / "configs" / m / "README.md" for m in METHODS]
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?![\d])")  # numbers written with a decimal point: accuracies, norms


def _text(path):
    return path.read_text(encoding="utf-8")


def _lines(path):
    """The file's lines with shell continuations (a trailing backslash) joined."""
    return _text(path).replace("\\\n", " ").splitlines()


def _commands(path):
    """(method, config, overrides) of every ``<method>.py --config FILE [--set k=v ...]`` in the file, skipping shell
    loops over variables (``$v``)."""
    out = []
    for line in _lines(path):
        for m in re.finditer(r"\b(\w+)\.py\s+--config\s+", line):
            if m.group(1) not in METHODS:
                continue
            rest = re.split(r"`|\s#|\s\||;|&&|<", line[m.end():])[0]
            if "$" in rest:
                continue
            tokens = shlex.split(rest)
            sets = []
            if "--set" in tokens:
                for tok in tokens[tokens.index("--set") + 1:]:
                    if tok.startswith("--"):
                        break
                    sets.append(tok)
            out.append((m.group(1), tokens[0], sets))
    return out


def test_every_method_has_its_readme():
    for m in METHODS:
        doc = ROOT / "configs" / m / "README.md"
        assert doc.is_file(), doc
        assert f"{m}.py" in _text(doc).splitlines()[0], f"{doc} should open with its script"


def test_readme_is_short():
    text = _text(README)
    assert len(text.splitlines()) <= 300, len(text.splitlines())
    assert len(text.encode("utf-8")) <= 25_000, len(text.encode("utf-8"))


def test_readme_answers_the_first_questions_in_its_first_120_lines():
    head = "\n".join(_text(README).splitlines()[:120])
    for word in ("python byol_uniform.py --config", "pytest", "torchrun", "--nnodes", "dist.nproc", "sbatch",
                 "srun", "resume=auto", "common.tools.evaluate", "common.tools.export", "data.name=folder",
                 "run folder"):
        assert word in head, f"{word!r} is not in the README's first 120 lines"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_named_config_paths_exist(doc):
    tokens = re.findall(r"configs/[^<>\s`'\"|()\[\],;:]*", _text(doc))
    paths = {t.rstrip(".") for t in tokens if "$" not in t}  # a shell loop's configs/toy_$ds.yaml is no path
    assert paths
    missing = [p for p in sorted(paths) if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_commands_resolve_with_the_scripts_parse(doc, tmp_path):
    commands = _commands(doc)
    assert commands, f"no commands found in {doc}"
    for method, config, sets in commands:
        mod, err = importlib.import_module(method), StringIO()
        argv = ["--config", str(ROOT / config)] + (["--set", *sets] if sets else [])
        try:
            with redirect_stderr(err):
                parse(argv, mod.DEFAULTS, getattr(mod, "CHOICES", None), method)
        except SystemExit:
            pytest.fail(f"{doc.name}: `{method}.py --config {config} --set {' '.join(sets)}` is refused: "
                        f"{err.getvalue().strip()}")


def _results_rows():
    """The README's results table: (method, paper cell, ours cell, command cell) per row."""
    text = _text(README)
    section = text.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in METHODS:
            rows.append(cells[:4])
    return rows


def test_results_table_has_every_method_and_a_quickstart_row_each():
    rows = _results_rows()
    assert {r[0] for r in rows} == set(METHODS)
    for m in METHODS:
        assert any(r[0] == m and r[3] == f"`python {m}.py --config configs/quickstart/{m}.yaml`" for r in rows), m


def test_results_table_numbers_agree_with_the_method_readmes():
    for method, paper, ours, command in _results_rows():
        doc = _text(ROOT / "configs" / method / "README.md")
        quickstart = command == f"`python {method}.py --config configs/quickstart/{method}.yaml`"
        cells = [paper] if quickstart else [paper, ours]  # the quickstart's band: its runs table's mean ± std
        for number in NUMBER.findall(" ".join(cells)):
            assert re.search(rf"(?<![\w.]){re.escape(number)}(?![\d])", doc), \
                f"README results table, {method}: {number} is not in configs/{method}/README.md"
        if quickstart:
            assert "<!-- quickstart runs -->" in doc or "results table" in doc, \
                f"configs/{method}/README.md should hold its quickstart runs (or point to the README's results table)"


def test_quickstart_comments_hold_no_measured_accuracy():
    for path in sorted((ROOT / "configs" / "quickstart").glob("*.yaml")):
        comments = " ".join(line.partition("#")[2] for line in _text(path).splitlines() if "#" in line)
        found = re.findall(r"\d+\.\d+\s*%|->\s*\d", comments)
        assert not found, f"{path.name}: a measured number in a comment ({found}); it belongs in README.md's table"


FM_BEGIN = "<!-- fashion_mnist table (rows of python -m common.tools.results configs/fashion_mnist.table) -->"
FM_END = "<!-- end of the fashion_mnist table -->"


def _fm_rows(path):
    text = _text(path)
    assert FM_BEGIN in text and FM_END in text, f"{path.name}: no Fashion-MNIST table block"
    block = text.split(FM_BEGIN, 1)[1].split(FM_END, 1)[0]
    return [line for line in block.splitlines() if line.startswith("|")][2:]


def test_fashion_mnist_table_is_one_table_and_each_method_readme_quotes_its_rows():
    """The README's Fashion-MNIST table (written by common.tools.results) has the floor, plain BYOL, the six methods and
    the ceiling; each configs/<method>/README.md shows its own row and the baselines' exactly as the README does."""
    readme = _fm_rows(README)
    cells = [r.split("|")[1].strip() for r in readme]
    assert set(cells) >= {"random-init", "byol", "supervised"}, cells
    for m in METHODS:
        rows = _fm_rows(ROOT / "configs" / m / "README.md")
        assert any(r.split("|")[1].strip() == m for r in rows), m
        for r in rows:
            assert r in readme, f"configs/{m}/README.md: a Fashion-MNIST row differs from README.md's: {r}"
