"""``python -m common.tools.results TABLE_FILE``: run every cell of a results table for every seed, then write the
table.

    python -m common.tools.results configs/fashion_mnist.table                        # all cells, 3 seeds: hours
    python -m common.tools.results configs/fashion_mnist.table --cells byol msbreg --seeds 0   # a part of it
    python -m common.tools.results configs/fashion_mnist.table --no-run               # the table of what is done
    python -m common.tools.results configs/fashion_mnist.table --cells byol --seeds 0 --out runs/fm_rerun  # again

The table file (YAML) names the cells and the real command of each::

    out_dir: runs/fashion_mnist   # run folders <out_dir>/<cell>/<method>/seed<S>; table.csv, table.md here
    seeds: [0, 1, 2]
    threads: 2                    # OMP_NUM_THREADS of every run
    data: {name: fashion_mnist, root: /usr/share/datasets}   # checked first; root passed to every run
    get_data: apt-get install dataset-fashion-mnist           # said when the data are missing
    cells:
      - {name: byol, cmd: python byol_uniform.py --config configs/byol_uniform/fashion_mnist_byol.yaml}

Each (cell, seed) runs as ``<cmd> --set seed=S out_dir=<out_dir>/<cell> name=seed<S> resume=auto
data.root=<root>``, one at a time, as a subprocess (its output in ``<out_dir>/<cell>/seed<S>.log``). A run with a
``summary.json`` is done and never run again; an interrupted one continues from its last checkpoint. A finished
run whose recorded command differs from the table's is an error (delete its folder to run it again).

The table: per cell, mean ± sample std over the seeds done of the ``summary.json`` values (kNN, linear probe,
the diagnostics of ``common.evaluate.monitor`` and the scripts), the MHE energy E_a2 of the projector and
predictor read from the run's last checkpoint (BYOL-MHE Eq. 11; cells with both heads), the wall time, and
whether the kNN and linear means clear the ``random-init`` cell's by more than 3 standard deviations (the
larger of the two cells' sample stds; "—" with fewer than 2 seeds).
"""
import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from common import checkpoint
from common.config import BASE, UserError, resolve
from common.log import mean_std

# (key in summary.json, column title, format); the means and stds of these go into table.csv and table.md
COLUMNS = [
    ("knn", "kNN top-1 (k=200, T=0.1)", "{:.1f}"),
    ("linear_top1", "linear top-1", "{:.1f}"),
    ("uniformity", "uniformity (f, t=2)", "{:.2f}"),
    ("center_norm", "‖s‖ (f)", "{:.3f}"),
    ("s_norm_test", "‖s‖ (z; center_penalty)", "{:.3f}"),  # the norm Eq. 32 penalises, of the normalised outputs
    ("corr_dist", "‖Σ−I‖²_F (f)", "{:.0f}"),
    ("erank", "eff. rank (f)", "{:.1f}"),
    ("mhe_energy", "E_a2 (g, q)", "{:.3f}"),
    ("sv_dist_test", "Σ(σ−1)² (p)", "{:.1f}"),
    ("wall_min", "wall (min)", "{:.1f}"),
]
RANDOM = "random-init"  # the cell every other must beat by 3 std (kNN and linear)


def load_table(path):
    """The table file, checked: out_dir, seeds, cells (unique names, each a command)."""
    try:
        t = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"table file {path}: {e.strerror}") from None
    need = {"out_dir", "seeds", "cells", "data"}
    if not isinstance(t, dict) or not need <= t.keys():
        raise UserError(f"table file {path} needs the keys {', '.join(sorted(need))}")
    names = [c["name"] for c in t["cells"]]
    if len(set(names)) != len(names) or any(not n or "/" in n for n in names):
        raise UserError(f"table file {path}: cell names must be unique plain names, got {names}")
    t.setdefault("threads", None)
    t.setdefault("get_data", "")
    return t


def check_data(t, root):
    """Stop before any run when the table's dataset is not there, saying where it looked and how to get it."""
    from common import data
    d = resolve(BASE, [({"data": {**t["data"], "root": root}}, "in the table file")]).data
    try:
        data.load(d, "test")
    except UserError as e:
        raise UserError(f"{e}. To get it: {t['get_data']}" if t["get_data"] else str(e)) from None


def run_dir(out_dir, cell, seed):
    """The run folder of (cell, seed), whatever the method's name: <out_dir>/<cell>/<method>/seed<S>."""
    found = sorted((Path(out_dir) / cell).glob(f"*/seed{seed}/summary.json"))
    return found[0].parent if found else None


def command(t, cell, seed, out_dir, root):
    argv = shlex.split(cell["cmd"])
    if argv[0] == "python":
        argv[0] = sys.executable
    return argv + ["--set", f"seed={seed}", f"out_dir={Path(out_dir) / cell['name']}", f"name=seed{seed}",
                   "resume=auto", f"data.root={root}"]


def run_missing(t, cells, seeds, out_dir, root):
    """Run every (cell, seed) of ``cells`` x ``seeds`` without a summary.json, one at a time."""
    env = dict(os.environ)
    if t["threads"]:
        env["OMP_NUM_THREADS"] = str(t["threads"])
    for cell in cells:
        for seed in seeds:
            cmd = command(t, cell, seed, out_dir, root)
            shown = shlex.join(["python", *cmd[1:]])
            stamp = Path(out_dir) / cell["name"] / f"seed{seed}.cmd"
            done = run_dir(out_dir, cell["name"], seed)
            if done:
                if stamp.exists() and stamp.read_text().strip() != shown:
                    raise UserError(f"{done} was run with another command ({stamp}); delete {done} to run "
                                    f"it again as: {shown}")
                print(f"done     {cell['name']} seed {seed}: {done}/summary.json", flush=True)
                continue
            print(f"running  {cell['name']} seed {seed}: {shown}", flush=True)
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(shown + "\n")
            log = stamp.with_suffix(".log")
            with open(log, "a") as f:
                code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                      stdin=subprocess.DEVNULL).returncode
            if code or not run_dir(out_dir, cell["name"], seed):
                tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
                raise UserError(f"{cell['name']} seed {seed} stopped (exit {code}); its output is in {log}; run "
                                f"the table command again to continue it:\n{tail}")


def mhe_energy(folder):
    """Mean over the projector (g) and predictor (q, or h) layers of E_a2/(N(N-1)) (BYOL-MHE Eq. 11, the
    function byol_mhe.py trains with) from the run's last checkpoint; None without both heads or checkpoint."""
    ckpt = Path(folder) / "checkpoints" / "last.pt"
    if not ckpt.exists():
        return None
    from byol_mhe import hyperspherical_energy  # (the table runs from the project's root)
    online = checkpoint.read(ckpt, "re-run its cell, or leave it out of the table").get("online", {})
    layers = {k: w for k, w in online.items() if k.split(".")[0] in ("g", "q", "h") and k.endswith(".weight")
              and w.ndim >= 2 and w.shape[0] > 1}
    parts = {k.split(".")[0] for k in layers}
    if "g" not in parts or not parts & {"q", "h"}:
        return None
    with torch.no_grad():
        return statistics.fmean(hyperspherical_energy(w.float(), "a2").item() for w in layers.values())


def row_values(folder):
    """The table's values of one finished run."""
    s = json.loads((Path(folder) / "summary.json").read_text())
    out = {k: s.get(k) for k, _, _ in COLUMNS}
    out["knn"] = s.get(f"knn{s['knn_k']}")
    out["mhe_energy"] = mhe_energy(folder)
    out["wall_min"] = s["wall_time_s"] / 60
    return out


def collect(t, seeds, out_dir):
    """{cell: {"n": seeds done, key: (mean, std)}} for the cells with at least one finished seed."""
    rows = {}
    for cell in t["cells"]:
        runs = [row_values(d) for d in (run_dir(out_dir, cell["name"], s) for s in seeds) if d]
        if runs:
            rows[cell["name"]] = {"n": len(runs), **{k: mean_std([r[k] for r in runs]) for k, _, _ in COLUMNS}}
    return rows


def beats_random(row, rnd, key):
    """Mean above the random-init cell's by more than 3 standard deviations (the larger of the two cells')."""
    (m, s), (mr, sr) = row[key], rnd[key]
    if m is None or mr is None or row["n"] < 2 or rnd["n"] < 2:  # (no spread from one seed)
        return None
    return m - mr > 3 * max(s, sr)


def write(t, rows, out_dir, table_path):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rnd = rows.get(RANDOM)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "seeds"] + [f"{k}_{x}" for k, _, _ in COLUMNS for x in ("mean", "std")]
                   + ["knn_beats_random_3std", "linear_beats_random_3std"])
        for name, r in rows.items():
            checks = [beats_random(r, rnd, k) if rnd and name != RANDOM else None for k in ("knn", "linear_top1")]
            w.writerow([name, r["n"]] + [("" if v is None else f"{v:.6g}") for k, _, _ in COLUMNS for v in r[k]]
                       + ["" if c is None else c for c in checks])

    def cell(r, k, fmt):
        m, s = r[k]
        return "—" if m is None else (f"{fmt.format(m)} ± {fmt.format(s)}" if r["n"] > 1 else fmt.format(m))

    lines = [f"Made by `python -m common.tools.results {table_path}` (mean ± sample std over the seeds; "
             f"OMP_NUM_THREADS={t['threads']}).", "",
             "| cell | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " | > random + 3σ (kNN, lin.) |",
             "|---|---" + "|---" * len(COLUMNS) + "|---|"]
    for name, r in rows.items():
        checks = [beats_random(r, rnd, k) if rnd and name != RANDOM else None for k in ("knn", "linear_top1")]
        mark = "" if name == RANDOM or not rnd else ", ".join({True: "yes", False: "NO", None: "—"}[c] for c in checks)
        lines.append(f"| {name} | {r['n']} | " + " | ".join(cell(r, k, fmt) for k, _, fmt in COLUMNS) + f" | {mark} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return out / "table.md"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", help="the table file (YAML), e.g. configs/fashion_mnist.table")
    ap.add_argument("--cells", nargs="+", help="only these cells (default: all)")
    ap.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: the table's)")
    ap.add_argument("--out", help="run folders and table here instead of the table's out_dir")
    ap.add_argument("--root", help="the dataset's folder instead of the table's data.root")
    ap.add_argument("--no-run", action="store_true", help="only write the table of the finished runs")
    args = ap.parse_args(argv)
    try:
        t = load_table(args.table)
        unknown = set(args.cells or ()) - {c["name"] for c in t["cells"]}
        if unknown:
            raise UserError(f"--cells {' '.join(sorted(unknown))}: not in {args.table} "
                            f"({', '.join(c['name'] for c in t['cells'])})")
        cells = [c for c in t["cells"] if not args.cells or c["name"] in args.cells]
        seeds, out_dir = args.seeds or t["seeds"], args.out or t["out_dir"]
        root = args.root or t["data"].get("root", "data")
        if not args.no_run:
            check_data(t, root)
            run_missing(t, cells, seeds, out_dir, root)
        path = write(t, collect(t, sorted(set(t["seeds"]) | set(seeds)), out_dir), out_dir, args.table)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(path.read_text(), end="")
    print(f"wrote {path} and {path.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
