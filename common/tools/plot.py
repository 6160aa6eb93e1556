"""Each paper's signature figure from run folders (optional: needs matplotlib).

    python -m common.tools.plot RUN_DIR [RUN_DIR ...] [--out DIR] [--epochs 1 50 100]

A RUN_DIR is a run folder (``config.yaml`` + ``metrics.jsonl``, see common/log.py) or any folder
above run folders (a sweep, the Tab. 1 variants, a RAFT seed folder): every run below it is used.
The method of a run is read from its config.yaml; the figures of every method found are drawn
into ``--out`` (default ``<first RUN_DIR>/figures``) as PNG files of a fixed pixel size
(``PANEL`` inches per panel at ``DPI``), with the papers' axis names:

    byol_uniform, byol_mhe  byol_fig2_s1.png              (BYOL-MHE Fig. 2/3) eval-set backbone features
                            of checkpoints/last.pt, PCA to 2-D and l2-normalised onto S¹: Gaussian KDE
                            in R² (top) and von Mises-Fisher KDE of the angles (bottom), one column per run
    raft                    raft_fig4_align_uniform.png   (RAFT Fig. 1b/4) L_align(q∘f) and L_uniform(f)
                            per epoch, runs overlaid
    center_penalty          center_fig3_knn_s.png         (CenterVector Fig. 3/4, B.1, B.4) kNN and ||s||
                            per epoch, runs overlaid; toy runs: mean ± std over seeds (shaded)
    decorr_nostopgrad       decorr_fig1_corr.png          (Decorr Fig. 1) ||Σ - I||² per epoch
                            decorr_fig3_wp.png            (Fig. 3) W_p heat maps at chosen epochs
                            decorr_fig4_wp.png            (Fig. 4) W_p asymmetry and eigenvalues per epoch
    msbreg                  msbreg_tab11.png              (MSBReg Tab. 11) linear top-1 over (λ_s, λ_b) per K
                            msbreg_tab12.png              (Tab. 12) L_align vs L_uniform, one point per run

Not drawn: CenterVector Fig. B.2 (the toy feature space with centre-vector arrows): toy runs save
neither their model nor their features. Kernel widths are plotting choices (``BW``), not the papers'.
"""
import argparse
import json
import sys
from collections import namedtuple
from pathlib import Path

import yaml

from common.config import UserError
from common.log import mean_std
from common.tools import or_exit

HINT = "leave its run out of the figures, or re-run it"  # what to do about an unreadable or corrupt checkpoint
INSTALL = "the figures need matplotlib, which the training scripts do not: pip install matplotlib"
PANEL, DPI = (4.0, 3.2), 100  # inches per panel, dots per inch: each panel is 400 x 320 pixels
BW = 0.1  # Gaussian KDE bandwidth on S¹ ⊂ R²; the vMF KDE uses the same width, κ = 1 / BW²
Run = namedtuple("Run", "path label method cfg records summary")
SIGNATURE = {"byol_mhe": ("mhe",), "byol_uniform": ("loss", "lambda_uni"), "msbreg": ("loss", "K"),
             "raft": ("loss", "objective"), "decorr_nostopgrad": ("diag",), "center_penalty": ("toy",)}


# --------------------------------------------------------------------------- reading runs
def method_of(cfg):
    """The script that wrote a resolved config: each method has a config key no other has."""
    for method, keys in SIGNATURE.items():
        node = cfg
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            return method
    return None


def read_run(path):
    """A run folder's config.yaml, metrics.jsonl (may be absent) and summary.json (may be absent)."""
    cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
    metrics, summary = path / "metrics.jsonl", path / "summary.json"
    records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    return Run(path, str(cfg.get("name") or path.name), method_of(cfg), cfg, records,
               json.loads(summary.read_text()) if summary.exists() else {})


def find_runs(paths):
    """Every run folder (one holding config.yaml) at or below the given paths, in path order."""
    found = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"{p}: no such folder (give run folders, e.g. runs/raft/raft-mlpp, or a folder above them)")
        dirs = [p] if (p / "config.yaml").is_file() else sorted(c.parent for c in p.rglob("config.yaml"))
        found += [read_run(d) for d in dirs if d not in [r.path for r in found]]
    if not found:
        raise UserError(f"no run folder (with config.yaml) at or below {', '.join(map(str, paths))}")
    return found


def series(records, key):
    """(epochs, mean, std) of ``key`` over the evaluation lines; several values at one epoch (toy runs: one
    per seed) give mean and sample std (``log.mean_std``). A ``<key>_init`` line (the random-init kNN) counts
    as ``key`` at epoch 0."""
    at = {}
    for r in records:
        v = r.get(key, r.get(key + "_init"))
        if v is not None:
            at.setdefault(r["epoch"], []).append(v)
    epochs = sorted(at)
    mean, std = zip(*(mean_std(at[e]) for e in epochs)) if epochs else ((), ())
    return epochs, list(mean), list(std)


# --------------------------------------------------------------------------- drawing helpers
def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or one clear UserError when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(INSTALL) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure(rows, cols, title):
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL[0] * cols, PANEL[1] * rows), dpi=DPI,
                             squeeze=False, layout="constrained")
    fig.suptitle(title, fontsize=10, wrap=True)
    return fig, axes


def save(fig, out, name):
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / name, dpi=DPI)  # no bbox_inches="tight": the pixel size stays PANEL x DPI per panel
    pyplot().close(fig)
    return out / name


def curves(runs, panels, title, out, name, label=lambda r: r.label):
    """One panel per (metric key, y label, log y); one line per run (shaded ± std where values repeat)."""
    fig, axes = figure(1, len(panels), title)
    for ax, (key, ylabel, logy) in zip(axes[0], panels):
        for r in runs:
            epochs, mean, std = series(r.records, key(r) if callable(key) else key)
            if epochs:
                line, = ax.plot(epochs, mean, marker=".", label=label(r))
                ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(xlabel="epoch", ylabel=ylabel, yscale="log" if logy else "linear")
    axes[0][0].legend(fontsize=7)
    return save(fig, out, name)


def knn_key(r):
    return f"knn{(r.cfg.get('eval') or {}).get('knn_k', [200])[0]}"


# --------------------------------------------------------------------------- the figures
def s1_features(run):
    """(angles [N] of the eval-set backbone features on S¹, labels [N]) from ``checkpoints/last.pt``:
    the online encoder f rebuilt from config.yaml, features PCA'd to 2-D, then l2-normalised."""
    import torch

    from common import checkpoint, loaders
    from common.config import BASE, Cfg, merge
    from common.evaluate import extract_features
    from common.tools import load_encoder

    cfg = Cfg.wrap(merge(BASE, run.cfg))  # over today's defaults: a key added since the run has its default
    cfg.eval.linear = "none"  # only the un-augmented loaders
    ckpt = run.path / "checkpoints" / "last.pt"
    f = load_encoder(checkpoint.load(ckpt, HINT), cfg.model, ckpt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    feats, labels = extract_features(f.to(device), loaders.eval_loaders(cfg)["test"], device)
    feats = (feats - feats.mean(0)).double()
    xy = feats @ torch.linalg.svd(feats, full_matrices=False).Vh[:2].T  # PCA: the top-2 principal directions
    xy = xy / xy.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.atan2(xy[:, 1], xy[:, 0]).cpu().numpy(), labels.cpu().numpy()


def byol_fig2_s1(runs, out, bw=BW, **_):
    """(BYOL-MHE Fig. 2/3; Wang & Isola Fig. 3) features on S¹: Gaussian KDE in R², vMF KDE of the angles."""
    import numpy as np

    runs = [r for r in runs if (r.path / "checkpoints" / "last.pt").is_file()]
    if not runs:
        return None
    fig, axes = figure(2, len(runs), "BYOL-MHE Fig. 2/3: eval-set features on $S^1$ (PCA to 2-D, l2-normalised)")
    grid, t, top_density = np.linspace(-1.25, 1.25, 200), np.linspace(-np.pi, np.pi, 400), 0.0
    for (top, bottom), r in zip(axes.T, runs):
        theta, _ = s1_features(r)
        x, y = np.cos(theta), np.sin(theta)
        kx, ky = (np.exp(-(grid[:, None] - v[None]) ** 2 / (2 * bw ** 2)) for v in (x, y))  # separable kernel
        density = ky @ kx.T / (len(x) * 2 * np.pi * bw ** 2)  # [y, x]
        top.imshow(density, extent=(grid[0], grid[-1], grid[0], grid[-1]), origin="lower", cmap="viridis")
        top.set(title=f"{r.label} ({r.method})", xlabel="feature 1", ylabel="feature 2", aspect="equal")
        kappa = 1 / bw ** 2  # vMF KDE: mean of exp(κ cos(t - θ_i)) / (2π I0(κ)), both scaled by exp(-κ)
        vmf = np.exp(kappa * (np.cos(t[:, None] - theta[None]) - 1)).mean(1)
        vmf /= 2 * np.pi * np.i0(kappa) * np.exp(-kappa)
        bottom.fill_between(t, vmf, alpha=0.4)
        bottom.plot(t, vmf)
        bottom.set(xlabel="angle (rad)", ylabel="density (vMF KDE)", xlim=(-np.pi, np.pi))
        top_density = max(top_density, vmf.max())
    for ax in axes[1]:
        ax.set_ylim(0, 1.05 * top_density)  # one density scale: the runs compare at a glance
    return save(fig, out, "byol_fig2_s1.png")


def raft_fig4_align_uniform(runs, out, **_):
    """(RAFT Fig. 4, Fig. 1b) L_align(q∘f) and L_uniform(f) of each epoch's training batches, runs overlaid."""
    return curves(runs, [("align_qf", r"$\mathcal{L}_{align}(q_w \circ f_\theta)$", False),
                         ("uniform_f", r"$\mathcal{L}_{uniform}(f_\theta)$", False)],
                  "RAFT Fig. 4: alignment and uniformity per epoch", out, "raft_fig4_align_uniform.png")


def center_fig3_knn_s(runs, out, **_):
    """(CenterVector Fig. 3/4, B.1, B.4) kNN accuracy and ||s|| of the normalised z on the eval set per epoch
    (image runs: ``s_norm_test``; toy runs, where z = f(x): ``center_norm``), mean ± std over the seeds."""
    def s_key(r):
        return "s_norm_test" if any("s_norm_test" in x for x in r.records) else "center_norm"
    return curves(runs, [(knn_key, "kNN accuracy (%)", False), (s_key, r"center vector norm $\|s\|$", False)],
                  "CenterVector Fig. 3/4: kNN and centre vector per epoch", out, "center_fig3_knn_s.png",
                  label=lambda r: f"{r.label} ({(r.cfg.get('loss') or {}).get('variant')})")


def decorr_fig1_corr(runs, out, **_):
    """(Decorr Fig. 1) ||Σ - I||² of the backbone features' correlation matrix (eval set) per epoch."""
    return curves(runs, [("corr_dist", r"$\|\Sigma - I\|^2$", True)],
                  "Decorr Fig. 1: feature decorrelation", out, "decorr_fig1_corr.png")


def wp_snapshots(run):
    """{epoch: {"W_p", "eigvals"?}} from predictor/W_p_epoch_*.pt and the W_p of every checkpoint."""
    from common import checkpoint
    snaps = {}
    for p in sorted(run.path.glob("checkpoints/*.pt")):
        s = checkpoint.read(p, HINT, mmap=True)  # mmap: the digest streams through the file, not held in memory
        if "W_p.weight" in s.get("online", {}):
            snaps.setdefault(s["counters"]["epoch"], {"W_p": s["online"]["W_p.weight"]})
    for p in sorted(run.path.glob("predictor/W_p_epoch_*.pt")):
        s = checkpoint.read(p, HINT)
        snaps[s["epoch"]] = s
    return snaps


def decorr_fig3_wp(runs, out, epochs=None, **_):
    """(Decorr Fig. 3) W_p as a heat map at ``epochs`` (default: up to 4 spread over the saved ones); a row per run."""
    rows = []
    for r in runs:
        snaps = wp_snapshots(r)
        saved = sorted(snaps)
        spread = sorted({saved[round(i * (len(saved) - 1) / 3)] for i in range(4)}) if saved else []
        chosen = sorted({e for e in epochs if e in snaps}) if epochs else spread  # first, last and two between
        missing = sorted(set(epochs or ()) - set(snaps))
        if missing:
            print(f"{r.label}: no W_p saved at epoch {missing} (saved: {saved})", file=sys.stderr)
        if chosen:
            rows.append((r, snaps, chosen))
    if not rows:
        return None
    fig, axes = figure(len(rows), max(len(e) for _, _, e in rows), "Decorr Fig. 3: $W_p$ at different epochs")
    for ax_row, (r, snaps, chosen) in zip(axes, rows):
        for ax in ax_row[len(chosen):]:
            ax.axis("off")
        for ax, e in zip(ax_row, chosen):
            w = snaps[e]["W_p"].float().numpy()
            lim = abs(w).max() or 1.0
            im = ax.imshow(w, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set(title=f"{r.label}, epoch {e}", xlabel="input dim", ylabel="output dim")
            fig.colorbar(im, ax=ax, shrink=0.8)
    return save(fig, out, "decorr_fig3_wp.png")


def decorr_fig4_wp(runs, out, **_):
    """(Decorr Fig. 4) (a) asymmetry ||W_p - W_pᵀ||_F/||W_p||_F per epoch; (b) W_p's eigenvalues (real parts)
    per epoch: all of them where predictor/ holds the spectra, else the logged max / median / min."""
    runs = [r for r in runs if series(r.records, "wp_asym")[0]]
    if not runs:
        return None
    fig, axes = figure(1, 2, "Decorr Fig. 4: $W_p$ becomes symmetric, its eigenvalues go to c or 0")
    a, b = axes[0]
    for r in runs:
        line, = a.plot(*series(r.records, "wp_asym")[:2], marker=".", label=r.label)
        spectra = {e: s["eigvals"] for e, s in wp_snapshots(r).items() if s.get("eigvals") is not None}
        if spectra:
            for i, (e, ev) in enumerate(sorted(spectra.items())):
                b.scatter([e] * len(ev), ev.real.numpy(), s=6, color=line.get_color(), label=None if i else r.label)
        else:
            for key, style in (("wp_eig_re_max", ":"), ("wp_eig_re_median", "-"), ("wp_eig_re_min", ":")):
                b.plot(*series(r.records, key)[:2], style, color=line.get_color(), label=f"{r.label} {key[10:]}")
    a.set(xlabel="epoch", ylabel=r"$\|W_p - W_p^\top\|_F / \|W_p\|_F$")
    b.set(xlabel="epoch", ylabel="eigenvalues of $W_p$ (real part)")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    return save(fig, out, "decorr_fig4_wp.png")


def score(r):
    """Tab. 11's number: linear top-1 of summary.json (the kNN monitor when the run had no linear probe)."""
    return r.summary.get("linear_top1", r.summary.get(knn_key(r)))


def msbreg_tab11(runs, out, **_):
    """(MSBReg Tab. 11) linear top-1 (%) over (λ_s, λ_b), one heat map per K, from finished runs."""
    import numpy as np

    runs = [r for r in runs if score(r) is not None]
    if not runs:
        return None
    Ks = sorted({r.cfg["loss"]["K"] for r in runs})
    ls, lb = (sorted({r.cfg["loss"][k] for r in runs}) for k in ("lambda_s", "lambda_b"))
    lo, hi = min(map(score, runs)), max(map(score, runs))  # one colour scale for every K
    fig, axes = figure(1, len(Ks), "MSBReg Tab. 11: linear top-1 (%) over $(\\lambda_s, \\lambda_b)$")
    for ax, K in zip(axes[0], Ks):
        acc = np.full((len(ls), len(lb)), np.nan)
        for r in runs:
            if r.cfg["loss"]["K"] == K:
                acc[ls.index(r.cfg["loss"]["lambda_s"]), lb.index(r.cfg["loss"]["lambda_b"])] = score(r)
        ax.imshow(acc, cmap="viridis", origin="lower", aspect="auto", vmin=lo, vmax=hi)
        for (i, j), v in np.ndenumerate(acc):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w")
        ax.set(title=f"K = {K}", xlabel=r"$\lambda_b$", ylabel=r"$\lambda_s$", xticks=range(len(lb)),
               yticks=range(len(ls)), xticklabels=[f"{v:g}" for v in lb], yticklabels=[f"{v:g}" for v in ls])
    return save(fig, out, "msbreg_tab11.png")


def msbreg_tab12(runs, out, **_):
    """(MSBReg Tab. 12) L_align vs L_uniform of each finished run (summary.json), labelled by run."""
    runs = [r for r in runs if "alignment" in r.summary and "uniformity" in r.summary]
    if not runs:
        return None
    fig, axes = figure(1, 1, "MSBReg Tab. 12: alignment vs uniformity")
    ax = axes[0][0]
    for r in runs:
        ax.scatter(r.summary["alignment"], r.summary["uniformity"])
        ax.annotate(r.label, (r.summary["alignment"], r.summary["uniformity"]), fontsize=6)
    ax.set(xlabel=r"$\mathcal{L}_{align}$", ylabel=r"$\mathcal{L}_{uniform}$")
    return save(fig, out, "msbreg_tab12.png")


FIGURES = {"byol_uniform": [byol_fig2_s1], "byol_mhe": [byol_fig2_s1], "raft": [raft_fig4_align_uniform],
           "center_penalty": [center_fig3_knn_s],
           "decorr_nostopgrad": [decorr_fig1_corr, decorr_fig3_wp, decorr_fig4_wp],
           "msbreg": [msbreg_tab11, msbreg_tab12]}


def draw(paths, out=None, epochs=None):
    """Draw every figure that applies to the runs at or below ``paths``; returns the files written."""
    pyplot()  # a missing matplotlib is the first thing to say
    runs = find_runs(paths)
    out = Path(out) if out else Path(paths[0]) / "figures"
    written = []
    for fn in dict.fromkeys(fn for figs in FIGURES.values() for fn in figs):  # each figure once, in order
        chosen = [r for r in runs if fn in FIGURES.get(r.method, [])]
        written.append(fn(chosen, out, epochs=epochs) if chosen else None)
    return [w for w in written if w is not None]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.tools.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders above them (sweeps)")
    ap.add_argument("--out", help="folder for the PNG files (default: <first RUN_DIR>/figures)")
    ap.add_argument("--epochs", type=int, nargs="+", help="epochs of the W_p heat maps (Decorr Fig. 3)")
    args = ap.parse_args(argv)
    written = or_exit(draw, args.runs, args.out, args.epochs)
    for w in written:
        print(w)
    if not written:
        print("no figure applies to these runs (see python -m common.tools.plot --help)", file=sys.stderr)


if __name__ == "__main__":
    main()
