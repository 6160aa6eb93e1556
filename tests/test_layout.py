"""The package's structure, read from the imports (ast): the core (what a method script imports, transitively)
holds no command and no script, and no module of ``common`` imports itself back through others (no circle)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("byol_uniform", "byol_mhe", "msbreg", "raft", "decorr_nostopgrad", "center_penalty")


def _module(path):
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imports():
    """{module: set of project modules it imports} for the scripts and every module of common/."""
    files = [ROOT / f"{s}.py" for s in SCRIPTS] + sorted((ROOT / "common").rglob("*.py"))
    known = {_module(f) for f in files}
    graph = {}
    for f in files:
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if not node.level else ".".join(_module(f).split(".")[:-node.level] + [node.module])
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            deps |= {n for n in names if n in known}
        graph[_module(f)] = deps - {_module(f)}
    return graph


def core(graph):
    out, todo = set(), [d for s in SCRIPTS for d in graph[s]]
    while todo:
        m = todo.pop()
        if m not in out:
            out.add(m)
            todo += graph[m]
    return out


def test_the_core_holds_no_command_and_no_script():
    c = core(imports())
    assert not {m for m in c if m.startswith("common.tools") or m in SCRIPTS}, c
    assert "common.run" in c and "common.evaluate" in c  # (the closure is read, not empty)


def test_no_import_circle_in_common():
    graph = imports()

    def reaches(a, b, seen=()):
        return any(d == b or (d not in seen and reaches(d, b, (*seen, d))) for d in graph.get(a, ()))
    circles = sorted(m for m in graph if m.startswith("common") and reaches(m, m))
    assert not circles, circles


# What a copied script brings: the core's lines, held so that growth is a decision, not a drift. The budget: the
# core's size when it was first stated (3,379 lines, 2026-12-06) plus 3%, plus each decision since, named.
CORE_LINES_START = 3379
CORE_GROWTH_DECIDED = {
    "--help lists every key from the tables that check it (issue #34)": 64,
    "checkpoint digest, one-line data and config errors, records kept on a failed write, time-based progress line "
    "(issue #35)": 128,
}
CORE_LINES_MAX = int(CORE_LINES_START * 1.03) + sum(CORE_GROWTH_DECIDED.values())


def test_the_core_stays_within_its_stated_size():
    n = sum(core_lines().values())
    assert n <= CORE_LINES_MAX, (f"the core grew to {n} lines, over {CORE_LINES_MAX}: make it smaller, or decide the "
                                 "growth in CORE_GROWTH_DECIDED and the README's Layout section")
    readme = (ROOT / "README.md").read_text()
    assert f"{CORE_LINES_MAX:,} lines of `common/`" in readme, "the README states the budget a copy brings"


def core_lines():
    """Lines of the core modules (printed by ``python tests/test_layout.py``)."""
    return {m: len((ROOT / (m.replace(".", "/") + ".py")).read_text().splitlines()) for m in sorted(core(imports()))
            if (ROOT / (m.replace(".", "/") + ".py")).exists()}


if __name__ == "__main__":
    lines = core_lines()
    print(f"core: {len(lines)} modules, {sum(lines.values())} lines")
    for m, n in lines.items():
        print(f"  {m:22s} {n}")
