"""common.evaluate on 2 CPU processes (Gloo) against 1 process: sharded feature extraction, split kNN scoring,
fast and paper linear probes (every rank calls them and gets the same dict)."""
import pytest
import torch
from gloo import on_processes

from common import evaluate as ev
from common import loaders
from common.config import parse
from common.models import resnet

# uneven sets: train 250 = eval batches 64, 64, 64, 58 (rank 0: 0 and 2, rank 1: 1 and 3); test 100 = 64, 36;
# the kNN monitor's single query chunk and the paper probe's feature-width batch leave rank 1 without one
TINY = ["data.synthetic.train_size=250", "data.synthetic.test_size=100", "model.width=8", "eval.batch_size=64",
        "eval.knn_k=[200,20]", "eval.linear_epochs=3", "eval.linear_batch_size=50"]
PAPER = ["eval.linear=paper", "eval.linear_lr=2.0"]
FIXED = ["augment.crop_scale=[1,1]", "augment.crop_ratio=[1,1]", "augment.flip_p=0"]  # deterministic views
KS = (1, 7, 40)


def _cfg(*more):
    return parse(["--set", *TINY, "device=cpu", *more])


def _encoder():
    torch.manual_seed(0)
    return resnet("resnet18", 8, True, "bn")[0]


def _pixels():
    """For the paper probe: features that 3 epochs of a linear head learn from (a random ResNet's do not)."""
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())


def _evaluate(views):
    """What each rank computes; ``views``: this rank's share of two fixed 'augmented' batches."""
    torch.set_num_threads(1)
    enc, dev, cfg = _encoder(), torch.device("cpu"), _cfg()
    lds = loaders.eval_loaders(cfg)
    train_f, train_y = ev.extract_features(enc, lds["train"], dev)
    test_f, test_y = ev.extract_features(enc, lds["test"], dev)
    out = {"train_f": train_f, "train_y": train_y, "test_f": test_f, "test_y": test_y,
           "monitor": ev.monitor(enc, lds, dev, cfg.eval, views=views),
           "fast": ev.final_linear_eval(enc, lds, dev, cfg)}
    for weighted in (True, False):  # query chunks of 16: both ranks score several
        out[f"knn_chunked_{weighted}"] = ev.knn_accuracies(train_f, train_y, test_f, test_y, ks=KS, chunk=16,
                                                           weighted=weighted, num_classes=10)
    cpu_views = ["augment.path=cpu", "data.workers=0"]
    for name, more in (("paper_fixed", FIXED), ("paper_random", []), ("paper_cpu", cpu_views)):
        cfg = _cfg(*PAPER, *more)
        out[name] = ev.final_linear_eval(_pixels(), loaders.eval_loaders(cfg), dev, cfg)
    return out


def _views():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)


def _rank_evaluate(rank, world):
    v1, v2 = _views()
    n = len(v1) // world
    return _evaluate((v1[rank * n:(rank + 1) * n], v2[rank * n:(rank + 1) * n]))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(one process, [rank 0, rank 1] of two processes)."""
    ranks = on_processes(_rank_evaluate)
    threads = torch.get_num_threads()
    try:
        one = _evaluate(_views())
    finally:
        torch.set_num_threads(threads)
    return one, ranks


def test_every_rank_returns_the_same_numbers(results):
    _, (r0, r1) = results
    for key in r0:
        if isinstance(r0[key], torch.Tensor):
            assert torch.equal(r0[key], r1[key]), key
        else:
            assert r0[key] == r1[key], key


def test_sharded_features_equal_one_process_bit_for_bit(results):
    one, (two, _) = results
    assert one["train_f"].shape == (250, 8 * 8) and one["test_f"].shape == (100, 64)
    for key in ("train_f", "train_y", "test_f", "test_y"):
        assert torch.equal(two[key], one[key]), key


def test_knn_and_fast_probe_equal_one_process_exactly(results):
    one, (two, _) = results
    for key in ("knn200", "knn20", "uniformity", "center_norm", "feature_std"):
        assert two["monitor"][key] == one["monitor"][key], key
    assert two["monitor"]["alignment"] == pytest.approx(one["monitor"]["alignment"], rel=1e-6)  # over both halves
    for weighted in (True, False):
        assert two[f"knn_chunked_{weighted}"] == one[f"knn_chunked_{weighted}"]
    assert two["fast"] == one["fast"] and one["fast"]["linear_protocol"] == "fast (offline)"


def test_paper_probe_in_ddp_matches_one_process(results):
    """The same images in every global step as one process, the head in DDP. Deterministic views: only float
    round-off differs, so top-1 and top-5 agree to within one test image (1 point of 100). Random views: each
    rank draws its own augmentations, another draw as another seed gives, so they agree to within the
    seed-to-seed spread of this probe (1 process, seeds 0-4: top-1 15-21 %, top-5 61-65 %): 6 points. Random
    views made per image (``augment.path=cpu``, seeded by image and epoch): the same views as one process, so
    again within one test image."""
    one, (two, _) = results
    assert one["paper_fixed"]["linear_top1"] > 20 and one["paper_random"]["linear_top1"] > 12  # chance: 10 %
    for key in ("linear_top1", "linear_top5"):
        assert abs(two["paper_fixed"][key] - one["paper_fixed"][key]) <= 1.0, key
        assert abs(two["paper_cpu"][key] - one["paper_cpu"][key]) <= 1.0, key
        assert abs(two["paper_random"][key] - one["paper_random"][key]) <= 6.0, key
    assert one["paper_fixed"]["linear_protocol"] == "paper (offline)"
    print("paper probe 1 vs 2 processes:", {k: (one[k], two[k]) for k in ("paper_fixed", "paper_random", "paper_cpu")})


# ------------------------------------------------------------------ the kNN bank sharded over 2 and 3 processes
def _banks():
    """The tie bank of test_evaluate (exact ties across shard edges) and a random one (250 rows, 10 classes)."""
    from test_evaluate import tie_bank
    g = torch.Generator().manual_seed(8)
    rnd = (torch.randn(250, 16, generator=g), torch.randint(0, 10, (250,), generator=g),
           torch.randn(70, 16, generator=g), torch.randint(0, 10, (70,), generator=g))
    return {"ties": (*tie_bank(), 4), "random": (*rnd, 10)}


def _knn_all(bank_of, sharded):
    torch.set_num_threads(1)
    out = {}
    for name, (train_f, train_y, test_f, test_y, c) in _banks().items():
        f, y = bank_of(train_f, train_y)
        for weighted in (True, False):
            for block in (4096, 7):  # one block; blocks whose edges are not the shards'
                out[name, weighted, block] = ev.knn_accuracies(f, y, test_f, test_y, ks=(1, 3, 7, 40), chunk=16,
                                                               num_classes=c, weighted=weighted, block=block,
                                                               sharded=sharded)
        out[name, "rows"] = len(f)
    return out


def _rank_knn(rank, world):
    def shard(f, y):
        lo, hi = ev.RankShard(len(f), 64).bounds()
        return f[lo:hi], y[lo:hi]
    return _knn_all(shard, sharded=True)


@pytest.mark.parametrize("world", [2, 3])
def test_a_sharded_knn_bank_gives_one_process_accuracies_exactly_ties_included(world):
    threads = torch.get_num_threads()
    try:
        one = _knn_all(lambda f, y: (f, y), sharded=False)
    finally:
        torch.set_num_threads(threads)
    ranks = on_processes(_rank_knn, world=world)
    for r, res in enumerate(ranks):
        for key, acc in one.items():
            if key[1] == "rows":
                n = acc
                assert res[key] <= -(-n // world) and sum(x[key] for x in ranks) == n, (r, key)  # <= ceil(N/W)
            else:
                assert res[key] == acc, (r, key)
    assert one["ties", True, 4096]["knn1"] < 100  # the labels disagree within a tie: the tie rule matters


def _rank_monitor(rank, world):
    """The monitor and the fast probe on each rank, with the rows of the bank each rank gives the kNN."""
    torch.set_num_threads(1)
    enc, dev, cfg = _encoder(), torch.device("cpu"), _cfg()
    rows, real = [], ev.knn_accuracies

    def spy(train_f, *a, **k):
        rows.append(len(train_f))
        return real(train_f, *a, **k)
    ev.knn_accuracies = spy
    lds = loaders.eval_loaders(cfg)
    try:
        return {"monitor": ev.monitor(enc, lds, dev, cfg.eval), "fast": ev.final_linear_eval(enc, lds, dev, cfg),
                "rows": rows, "probe_rows": len(ev.extract_features(enc, lds["train"], dev, gather=False)[0])}
    finally:
        ev.knn_accuracies = real


def test_three_processes_hold_a_third_of_the_bank_and_give_one_process_numbers(results):
    """250 training images over 3 processes: each holds at most 84 rows of the bank (and of the fast probe's
    training features); the kNN accuracies, the diagnostics and the fast probe are one process's."""
    one, _ = results
    ranks = on_processes(_rank_monitor, world=3)
    assert [r["rows"] for r in ranks] == [[84], [84], [82]]
    assert [r["probe_rows"] for r in ranks] == [84, 84, 82]
    for r in ranks:
        for key in ("knn200", "knn20", "uniformity", "center_norm", "feature_std", "corr_dist", "erank"):
            assert r["monitor"][key] == one["monitor"][key], key
        assert r["fast"] == one["fast"]
