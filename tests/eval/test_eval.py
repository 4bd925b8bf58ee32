"""kNN (DINO's weighted vote) against a direct implementation, the linear probe, and labelled folders."""
import logging

import numpy as np
import pytest
import torch

from seer.eval import (Evaluator, LabelledSplit, extract_features, fit_logistic, knn_predict, knn_top1,
                       linear_probe, load_labelled)
from seer.config import EvalConfig
from tests.dist_utils import run_distributed
from tests.images import image_bytes


def _knn_reference(train, ytrain, test, k, t, c):
    """Per test point: cosine to every training point, the k best vote exp(s / T) for their class."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for x in test:
        s = train @ x
        best = np.argsort(-s, kind="stable")[:k]
        votes = np.zeros(c)
        for j in best:
            votes[ytrain[j]] += np.exp(s[j] / t)
        out.append(int(np.argmax(votes)))
    return np.array(out)


def test_knn_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 12, generator=g), torch.randn(50, 12, generator=g)
    y = torch.randint(0, 5, (300,), generator=g)
    for k, t in ((20, 0.07), (1, 0.1), (7, 1.0)):
        got = knn_predict(train, y, test, k=k, temperature=t, num_classes=5, chunk=16)
        want = _knn_reference(train.double().numpy(), y.numpy(), test.double().numpy(), k, t, 5)
        assert (got.numpy() == want).mean() >= 0.98  # float ties may differ
    assert knn_top1(train, y, train, y, k=1) == 100.0


def test_knn_small_temperature_votes_without_overflow():
    # Class 0: one neighbour at cosine 1; class 1: two at 0.999. At T = 0.005 class 1 wins (2 exp(-0.2) > 1),
    # but exp(s / T) is inf in float32 for all three: the classes tied at inf and class 0 won.
    c = 0.999
    train = torch.tensor([[1.0, 0.0], [c, (1 - c * c) ** 0.5], [c, -(1 - c * c) ** 0.5]])
    y = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    want = _knn_reference(train.double().numpy(), y.numpy(), test.double().numpy(), 3, 0.005, 2)
    assert want.tolist() == [1]
    assert knn_predict(train, y, test, k=3, temperature=0.005).tolist() == [1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be a positive int"), (dict(k=-3), "k must be a positive int"),
    (dict(k=2.5), "k must be a positive int"), (dict(temperature=0.0), "temperature must be a positive"),
    (dict(temperature=-0.07), "temperature must be a positive"),
    (dict(temperature=float("nan")), "temperature must be a positive"), (dict(chunk=0), "chunk must be"),
    (dict(train_labels=torch.zeros(11, dtype=torch.int64)), "train_labels must be a 1-D integer tensor"),
    (dict(train_labels=torch.zeros(10)), "train_labels must be a 1-D integer tensor"),
    (dict(train_labels=-torch.ones(10, dtype=torch.int64)), "train_labels must be"),
    (dict(test_features=torch.randn(4, 5)), "test_features have 5 dims"),
    (dict(train_features=torch.randn(10)), "train_features must be a 2-D float tensor"),
    (dict(train_features=torch.zeros(0, 6)), "no training features"),
    # one NaN training row was every test point's nearest neighbour: all predictions became its class
    (dict(train_features=torch.randn(10, 6).index_fill_(0, torch.tensor([4]), float("nan"))),
     "train_features has 1 rows with NaN or inf"),
    (dict(test_features=torch.full((4, 6), float("inf"))), "test_features has 4 rows with NaN or inf"),
    (dict(num_classes=2), "num_classes must be an int >= the largest train label \\+ 1 \\(3\\)"),
])
def test_knn_refuses_bad_arguments(kwargs, match):
    args = dict(train_features=torch.randn(10, 6), train_labels=torch.arange(10) % 3,
                test_features=torch.randn(4, 6))
    if "train_features" in kwargs and kwargs["train_features"].shape[:1] == (0,):
        args["train_labels"] = torch.zeros(0, dtype=torch.int64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        knn_predict(**args)
    with pytest.raises(ValueError, match="test_labels must be"):
        knn_top1(torch.randn(10, 6), torch.arange(10) % 3, torch.randn(4, 6), torch.arange(3))


def test_knn_takes_any_integer_labels_and_counts_exactly():
    """uint8/int16 labels failed in scatter_add_ (int64 indices only), an empty test set in max(), and a float32
    mean reported 1 of 5 as 20.000000298023224."""
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(40, 6, generator=g), torch.randn(5, 6, generator=g)
    y = torch.arange(40) % 4
    want = knn_predict(train, y, test, k=5)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(knn_predict(train, y.to(dtype), test, k=5), want)
    hits = torch.zeros(5, dtype=torch.int64)
    hits[0] = want[0]
    hits[1:] = (want[1:] + 1) % 4
    assert knn_top1(train, y, test, hits.to(torch.int32), k=5) == 20.0
    with pytest.raises(ValueError, match="no test features"):
        knn_top1(train, y, test[:0], y[:0])
    with pytest.raises(ValueError, match="test_labels must be a 1-D integer tensor"):
        knn_top1(train, y, test, hits.float())


def test_knn_takes_sparse_label_ids():
    """The vote held one column per label up to the largest: chunk x (max + 1) floats, an allocation error
    here and, for ids around 10^9, a process killed for memory."""
    g = torch.Generator().manual_seed(5)
    train, test = torch.randn(60, 6, generator=g), torch.randn(25, 6, generator=g)
    y = torch.arange(60) % 3
    ids = torch.tensor([7, 2 ** 40, 2 ** 62])
    want = ids[knn_predict(train, y, test, k=9, chunk=10)]
    assert torch.equal(knn_predict(train, ids[y], test, k=9, chunk=10), want)
    assert knn_top1(train, ids[y], test, want, k=9) == 100.0


def test_linear_probe_learns_a_linear_rule_and_picks_the_regularisation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 20, generator=g)
    w = torch.randn(20, 4, generator=g)
    y = (x @ w).argmax(1)
    res = linear_probe(x[:300], y[:300], x[300:], y[300:], weight_decays=[1e-4, 1.0], max_iter=100)
    assert res["top1"] > 90 and res["weight_decay"] == 1e-4
    noise = linear_probe(x[:300], torch.randint(0, 4, (300,), generator=g), x[300:], y[300:], max_iter=50)
    assert noise["top1"] < 50


@pytest.mark.parametrize("kwargs, match", [
    (dict(train_labels=torch.zeros(7, dtype=torch.int64)), "train_labels must be a 1-D integer tensor"),
    (dict(test_labels=torch.zeros(6)), "test_labels must be a 1-D integer tensor"),
    (dict(test_features=torch.randn(6, 4)), "test_features have 4 dims"),
    (dict(train_features=torch.randn(12, 5).index_fill_(0, torch.tensor([3]), float("nan"))),
     "train_features has 1 rows with NaN or inf"),
    (dict(test_features=torch.zeros(0, 5), test_labels=torch.zeros(0, dtype=torch.int64)),
     "test_features must be a non-empty 2-D float tensor"),
    (dict(weight_decays=[]), "weight_decays must be a non-empty list"),
    (dict(weight_decays=[-1.0]), "weight_decays must be a non-empty list"),
    (dict(max_iter=0), "max_iter must be a positive int"),
])
def test_linear_probe_refuses_bad_arguments(kwargs, match):
    """Each was an IndexError or a RuntimeError deep in torch, or (NaN) a silent score on NaN features."""
    args = dict(train_features=torch.randn(12, 5), train_labels=torch.arange(12) % 3,
                test_features=torch.randn(6, 5), test_labels=torch.arange(6) % 3, max_iter=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_probe(**args)


def test_linear_probe_takes_int32_labels_and_a_single_training_feature():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    want = linear_probe(x[:40], y[:40], x[40:], y[40:], max_iter=20)
    assert linear_probe(x[:40], y[:40].int(), x[40:], y[40:].int(), max_iter=20) == want  # was a RuntimeError
    # One training feature (its std was NaN: every feature NaN, a chance score): the probe predicts its class.
    one = linear_probe(x[:1], y[:1], x[40:], y[40:], max_iter=20)
    assert one["top1"] == 100.0 * float((y[40:] == y[0]).double().mean())


def test_linear_probe_takes_sparse_label_ids():
    """W had one row per label up to the largest: an allocation error here, minutes of L-BFGS for ids around
    10^5, a process killed for memory beyond."""
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    ids = torch.tensor([7, 2 ** 40, 2 ** 62])
    want = linear_probe(x[:40], y[:40], x[40:], y[40:], max_iter=20)
    assert linear_probe(x[:40], ids[y[:40]], x[40:], ids[y[40:]], max_iter=20) == want


def test_linear_probe_says_when_lbfgs_stops_short_of_the_optimum(caplog):
    """A fit cut off by max_iter was scored without a word: a low number that read as the features' quality."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(80, 10, generator=g)
    y = (x @ torch.randn(10, 3, generator=g)).argmax(1)
    with caplog.at_level(logging.INFO, logger="seer.eval.linear"):
        short = linear_probe(x[:60], y[:60], x[60:], y[60:], weight_decays=[1e-3], max_iter=2)
    assert short["converged"] is False
    assert "L-BFGS stopped at max_iter=2 iterations short of the optimum" in caplog.text
    assert "raise eval.linear_max_iter" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seer.eval.linear"):
        full = linear_probe(x[:60], y[:60], x[60:], y[60:], weight_decays=[1e-2])
    assert full["converged"] is True and not caplog.text
    info = {}
    fit_logistic(x.double(), y, 3, 1e-2, 200, info=info)
    assert info["converged"] and info["grad_max"] <= 1e-5 and 1 <= info["iterations"] < 200


@pytest.mark.cuda
def test_linear_probe_on_gpu_features():
    """The weights were made on the CPU whatever the features' device: a device-mismatch RuntimeError."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    want = linear_probe(x[:40], y[:40], x[40:], y[40:], max_iter=20)
    got = linear_probe(x[:40].cuda(), y[:40].cuda(), x[40:].cuda(), y[40:].cuda(), max_iter=20)
    assert got["weight_decay"] == want["weight_decay"] and abs(got["top1"] - want["top1"]) <= 100 / 20


def test_class_folders_with_and_without_a_split(tmp_path, caplog):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / "a" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                (d / f"{i}.png").write_bytes(image_bytes(i + (10 if c == "dog" else 0), (20, 30)))
    (tmp_path / "a" / "train" / "dog" / "broken.png").write_bytes(b"junk")
    s = load_labelled(str(tmp_path / "a"))
    assert len(s["train"]) == 7 and len(s["test"]) == 6 and s["train"].classes == ["cat", "dog"]
    flat = load_labelled(str(tmp_path / "a" / "train"), test_fraction=0.3)
    assert len(flat["train"]) + len(flat["test"]) == 7 and len(flat["test"]) == 2
    with pytest.raises(ValueError, match="one subfolder per class"):
        load_labelled(str(tmp_path / "a" / "train" / "cat"))
    # a large test fraction of few images keeps one to train on (all went to the test split, and the
    # evaluation then called the empty train split unreadable); one image cannot be split
    two = load_labelled(str(tmp_path / "a" / "train"), test_fraction=0.95)
    assert len(two["train"]) == 1 and len(two["test"]) == 6
    _class_images(tmp_path / "one", n=1, bad={("dog", 0)})
    (tmp_path / "one" / "dog" / "0.png").unlink()
    with pytest.raises(ValueError, match="has 1 image; split by eval.test_fraction it needs at least 2"):
        load_labelled(str(tmp_path / "one"))
    # a cap on the images keeps every class (the folder lists them class by class), the same ones every time
    with caplog.at_level(logging.INFO, logger="seer.eval.datasets"):
        capped = load_labelled(str(tmp_path / "a"), max_images=4)
    # (said, not silent: a preset's cap, the tiny one's 200, changes the scores of a larger folder)
    assert "eval.max_images=4: the train split of" in caplog.text and "on 4 of its 7 images" in caplog.text
    assert "the test split of" in caplog.text and "on 4 of its 6 images" in caplog.text
    assert len(capped["train"]) == 4 and capped["train"].labels.tolist().count(0) == 2
    assert capped["test"].labels.tolist().count(1) == 2
    assert capped["train"].images == load_labelled(str(tmp_path / "a"), max_images=4)["train"].images

    class Mean(torch.nn.Module):  # a "backbone": per-channel means and stds of the image
        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    ev = Evaluator(EvalConfig(dataset=str(tmp_path / "a"), knn_k=3, linear_weight_decays=[1e-3]), image_size=16,
                   mean=[0.5] * 3, std=[0.25] * 3)
    res = ev.evaluate(Mean())
    assert res["skipped"] == 1 and res["n_train"] == 6 and res["n_test"] == 6
    assert 0 <= res["knn_top1"] <= 100 and 0 <= res["linear_top1"] <= 100


def _class_images(root, classes=("cat", "dog"), n=3, bad=()):
    for c in classes:
        d = root / c
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{i}.png").write_bytes(b"junk" if (c, i) in bad else image_bytes(i + 10 * len(c), (20, 30)))


def test_split_folders_go_in_pairs_and_links_loops_are_no_classes(tmp_path):
    """'train/' with 'validation/' was read as two class folders named train and validation, randomly re-split
    (a meaningless score without a word); a train/ without a held-out split, or the reverse, is refused."""
    for split in ("train", "validation"):
        _class_images(tmp_path / "a" / split)
    s = load_labelled(str(tmp_path / "a"))
    assert s["train"].classes == ["cat", "dog"] and len(s["train"]) == 6 and len(s["test"]) == 6
    assert all("/validation/" in p for p in s["test"].images)
    for only in ("train", "val", "test"):
        _class_images(tmp_path / only / only)
        with pytest.raises(ValueError, match=f"has a '{only}/' folder but not"):
            load_labelled(str(tmp_path / only))
    (tmp_path / "a" / "train" / "loop").symlink_to("loop")  # a link loop: no class (was a raw OSError)
    assert load_labelled(str(tmp_path / "a"))["train"].classes == ["cat", "dog"]
    # classes that happen to be named like splits, next to others (CIFAR-100 has 'train'), stay classes
    _class_images(tmp_path / "cifar", classes=("apple", "test", "train", "val"))
    assert load_labelled(str(tmp_path / "cifar"))["train"].classes == ["apple", "test", "train", "val"]


def test_splits_with_other_class_folders_name_them_and_an_empty_class_folder_is_a_class(tmp_path):
    """The error said only that the class folders differ (out of 1000, which?)."""
    _class_images(tmp_path / "a" / "train", classes=("cat", "dog", "emu"))
    _class_images(tmp_path / "a" / "val", classes=("cat", "cow", "dog", "yak"))
    with pytest.raises(ValueError, match=r"different class folders \(val alone: 'cow', 'yak'; train alone: 'emu'\)"):
        load_labelled(str(tmp_path / "a"))
    for split, c in (("train", "cow"), ("train", "yak"), ("val", "emu")):  # as the message advises
        (tmp_path / "a" / split / c).mkdir()
    s = load_labelled(str(tmp_path / "a"))
    assert s["train"].classes == s["test"].classes == ["cat", "cow", "dog", "emu", "yak"]
    assert sorted(set(s["test"].labels.tolist())) == [0, 1, 2, 4]
    # A held-out split with one of the classes: named as the class it lacks, not as "at least 2, found 1"
    _class_images(tmp_path / "b" / "train", classes=("cat", "dog"))
    _class_images(tmp_path / "b" / "val", classes=("cat",))
    with pytest.raises(ValueError, match=r"different class folders \(train alone: 'dog'\)"):
        load_labelled(str(tmp_path / "b"))


def test_unreadable_evaluation_images_are_named_and_an_empty_split_is_refused(tmp_path, caplog):
    root = tmp_path / "d"
    _class_images(root / "train")
    _class_images(root / "val", bad={(c, i) for c in ("cat", "dog") for i in range(3)})

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    ev = Evaluator(EvalConfig(dataset=str(root), knn_k=3), image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="every image of its test split .6 files. is "
                                                                     "unreadable"):
        ev.evaluate(Mean())  # was a RuntimeError from an empty max() in the kNN
    assert f"evaluation skips unreadable image {root / 'val' / 'cat' / '0.png'} (ValueError: decode" in caplog.text


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_extract_features_names_a_bad_batch_size(batch_size):
    """0 was a ZeroDivisionError, -1 ran no batch and returned no features, every image counted unreadable."""
    split = LabelledSplit(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), torch.arange(5))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        extract_features(torch.nn.Flatten(), split, image_size=8, mean=[0.5] * 3, std=[0.25] * 3,
                         batch_size=batch_size)


def _flat_features(images, labels, batch_size, world):
    """extract_features of a fixed linear map of the pixels, over a gloo group of ``world`` (None: alone)."""
    import torch.distributed as dist
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(5, 3 * 8 * 8, generator=torch.Generator().manual_seed(0)))
        net[1].bias.zero_()
    group = dist.new_group(backend="gloo") if world else None
    return extract_features(net, LabelledSplit(images, labels), image_size=8, mean=[0.5] * 3, std=[0.25] * 3,
                            batch_size=batch_size, group=group)


def _flat_features_body(rank, world, images, labels, batch_size):
    return _flat_features(images, labels, batch_size, world)


def test_distributed_features_are_gathered_in_image_order_with_their_labels(tmp_path):
    """2 gloo ranks, 9 images (shards of 5 and 4, batches of 2 that divide neither), one unreadable in each
    shard, sparse labels: every rank holds the single process's rows, in image order, beside their labels."""
    paths = []
    for i in range(9):
        p = tmp_path / f"{i}.png"
        p.write_bytes(b"not an image" if i in (2, 7) else image_bytes(i, (8 + i, 10)))
        paths.append(str(p))
    labels = torch.tensor([40, 3, 17, 3, 99, 40, 5, 17, 3])
    want_f, want_y, want_bad = _flat_features(paths, labels, 2, None)
    assert want_bad == 2 and want_y.tolist() == [40, 3, 3, 99, 40, 5, 3]
    for f, y, bad in run_distributed(_flat_features_body, 2, paths, labels, 2):
        assert torch.equal(y, want_y) and bad == want_bad and torch.allclose(f, want_f, atol=1e-6)


def test_random_init_backbone_is_the_runs_initialisation():
    """seer eval --random-init builds the trunk alone: it must draw the weights that a single-device run drew
    for it inside the SwAV model (the per-tensor generators are keyed by name; they differed by the
    'backbone.' prefix)."""
    from seer.config import preset
    from seer.parallel import ParallelDims
    from seer.train.build import build_backbone, build_model
    cfg = preset("tiny")
    trained = build_model(cfg, ParallelDims(cfg.parallel, device_type="cpu", world_size=1), torch.device("cpu"))
    alone = build_backbone(cfg).state_dict()
    assert all(torch.equal(v, alone[k]) for k, v in trained.backbone.state_dict().items())


def test_digits_split_is_fixed_and_labels_hidden_from_training():
    from seer.data.digits import digits_images, digits_split
    d = digits_split(16)
    assert len(d["train"][0]) == 1200 and len(d["test"][0]) == 597
    assert torch.equal(digits_images(16, "train"), d["train"][0])
    assert d["train"][0].dtype == torch.uint8 and tuple(d["train"][0].shape[1:]) == (3, 16, 16)


def test_images_with_non_finite_features_are_dropped_and_counted(tmp_path, caplog):
    """One image whose features overflow (NaN) decided every kNN vote and made the probe's standardisation NaN
    for all features: it is dropped, counted and logged, and the scores are those without it."""
    _class_images(tmp_path / "d" / "train", n=4)
    _class_images(tmp_path / "d" / "val", n=3)

    class Poisoned(torch.nn.Module):  # per-channel means; NaN for the ``bad``-th image it sees
        def __init__(self, bad):
            super().__init__()
            self.bad, self.seen = bad, 0

        def forward(self, x):
            f = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
            if self.seen <= self.bad < self.seen + len(x):
                f[self.bad - self.seen] = float("nan")
            self.seen += len(x)
            return f

    cfg = EvalConfig(dataset=str(tmp_path / "d"), knn_k=3, linear_weight_decays=[1e-3], batch_size=2)
    ev = Evaluator(cfg, image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    with caplog.at_level("WARNING"):
        got = ev.evaluate(Poisoned(bad=1))  # the second training image
    assert "drops 1 of the 8 images of its train split" in caplog.text
    clean = Evaluator(cfg, image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    keep = torch.tensor([i for i in range(8) if i != 1])
    clean.splits["train"] = clean.splits["train"].subset(keep)
    want = clean.evaluate(Poisoned(bad=-1))
    assert got["non_finite"] == 1 and got["n_train"] == 7 and "non_finite" not in want
    assert (got["knn_top1"], got["linear_top1"]) == (want["knn_top1"], want["linear_top1"])


def test_evaluation_images_above_the_pixel_limit_are_skipped_as_in_training(tmp_path, caplog):
    """Evaluation decoded any image whole, without training's decompression-bomb guard (data.max_image_pixels):
    a small file claiming a huge image could exhaust the memory of a run's periodic evaluation."""
    root = tmp_path / "d"
    _class_images(root / "train")
    _class_images(root / "val")
    (root / "train" / "cat" / "big.png").write_bytes(image_bytes(7, (40, 40)))  # 1,600 pixels, the others 600

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    cfg = EvalConfig(dataset=str(root), knn_k=3, linear=False)
    with caplog.at_level("WARNING"):
        res = Evaluator(cfg, image_size=16, mean=[0.5] * 3, std=[0.25] * 3, max_pixels=1000).evaluate(Mean())
    assert res["skipped"] == 1 and res["n_train"] == 6
    assert "big.png (ValueError: 40 x 40 pixels exceed data.max_image_pixels=1000" in caplog.text
    assert Evaluator(cfg, image_size=16, mean=[0.5] * 3, std=[0.25] * 3).evaluate(Mean())["skipped"] == 0


def test_evaluation_images_above_the_byte_limit_are_skipped_unread_as_in_training(tmp_path, caplog):
    """Evaluation read every file whole (data.max_image_bytes: a 20 GB file named .jpg in eval.dataset
    exhausted the memory of a run's periodic evaluation), and with a plain open(), which waits forever on a
    fifo; both are refused as training refuses them."""
    from seer.eval.datasets import read_image
    from tests.data.test_special_files import _FifoWriter
    root = tmp_path / "d"
    _class_images(root / "train")
    _class_images(root / "val")
    big = root / "train" / "cat" / "big.png"
    with open(big, "wb") as f:
        f.truncate(600 * 2**20)  # sparse: no disk, and refused unread, no memory

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    cfg = EvalConfig(dataset=str(root), knn_k=3, linear=False)
    with caplog.at_level("WARNING"):
        res = Evaluator(cfg, image_size=16, mean=[0.5] * 3, std=[0.25] * 3).evaluate(Mean())
    assert res["skipped"] == 1 and res["n_train"] == 6
    assert f"big.png (ValueError: {600 * 2**20} bytes exceed data.max_image_bytes={512 * 2**20} (not read))" \
        in caplog.text
    small = root / "val" / "dog" / "0.png"
    assert read_image(str(small), max_bytes=small.stat().st_size)[1] is None
    assert read_image(str(small), max_bytes=small.stat().st_size - 1)[1] == \
        f"ValueError: {small.stat().st_size} bytes exceed data.max_image_bytes={small.stat().st_size - 1} (not read)"
    fifo = _FifoWriter(tmp_path / "pipe.png", image_bytes(0))
    try:
        assert read_image(str(tmp_path / "pipe.png")) == (None, "OSError: [Errno 22] not a regular file (a fifo): "
                                                               f"'{tmp_path / 'pipe.png'}'")
    finally:
        fifo.close()


def test_capped_splits_take_turns_over_many_classes_quickly():
    """eval.max_images drew its images with a loop over the classes: a minute for 10,000 classes of 200,000
    images (iNaturalist-sized label sets), at every Evaluator's start. The draw is the same as that loop's."""
    from seer.eval.datasets import _stratified

    def by_class_loop(labels, count, seed):
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        ranked = labels[perm]
        turn = torch.empty_like(perm)
        for c in ranked.unique():
            turn[ranked == c] = torch.arange(int((ranked == c).sum()))
        return perm[torch.sort(turn, stable=True).indices[:count]].sort().values

    g = torch.Generator().manual_seed(4)
    for seed in range(30):
        n, c = int(torch.randint(1, 200, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
        y = torch.randint(0, c, (n,), generator=g)
        count = int(torch.randint(1, n + 1, (1,), generator=g))
        assert torch.equal(_stratified(y, count, seed), by_class_loop(y, count, seed))
    # The large case (no timing assertion here: about 0.4 s on the 2-core CPU, the loop 69 s)
    y = torch.randint(0, 10_000, (200_000,), generator=g)
    idx = _stratified(y, 10_000, 0)
    assert y[idx].unique().numel() == 10_000  # turns: every class once before any class twice


def test_an_evaluation_folder_under_home_is_found_from_a_tilde_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _class_images(tmp_path / "val", n=4)
    splits = load_labelled("~/val", test_fraction=0.5)
    assert len(splits["train"]) + len(splits["test"]) == 8 and splits["train"].classes == ["cat", "dog"]
