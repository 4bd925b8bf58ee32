"""seer_kernels.sample_crop_params, CropParams and MultiCropSpec: SwAV's distributions with torchvision's
RandomResizedCrop semantics, exact where the law is deterministic, statistically elsewhere."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import seer_kernels
from seer_kernels import CropGroup, CropParams, MultiCropSpec, sample_crop_params
from seer_kernels.multicrop_params import COL, PACK_COLUMNS, SWAV_STD, VISSL_STD

N = 20000  # crops per statistical test: ~10 ms to draw


def _torchvision_boxes(hw, scale, ratio, n):
    T = pytest.importorskip("torchvision.transforms")
    img = torch.zeros(1, *hw)
    return torch.tensor([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)],
                        dtype=torch.float64)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


def _ks_bound(n: int, m: int, alpha: float = 1e-6) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


# ---- RandomResizedCrop ---------------------------------------------------------------------------

def test_box_sides_match_torchvision_when_the_law_is_deterministic(gen):
    # scale (s, s) with s exact in float32 and ratio (1, 1): h = w = round(sqrt(s H W)) in both.
    for _ in range(20):
        hw = tuple(int(v) for v in torch.randint(1, 700, (2,), generator=gen))
        s = int(torch.randint(1, 65, (), generator=gen)) / 64
        ours = sample_crop_params(hw, 4, (s, s), gen, ratio=(1.0, 1.0)).box
        theirs = _torchvision_boxes(hw, (s, s), (1.0, 1.0), 4)
        assert torch.equal(ours[:, 2:].double(), theirs[:, 2:]), (hw, s)
        assert (ours[:, :2] >= 0).all() and (ours[:, 0] + ours[:, 2] <= hw[0]).all()
        assert (ours[:, 1] + ours[:, 3] <= hw[1]).all()


@pytest.mark.parametrize("hw", [(600, 200), (200, 600), (300, 301), (37, 1000), (1, 1), (5, 3)])
def test_fallback_after_ten_failed_tries_matches_torchvision(hw, gen):
    # A target area of twice the image never fits: every try fails and both take the centred fallback.
    ours = sample_crop_params(hw, 3, (2.0, 2.0), gen).box
    theirs = _torchvision_boxes(hw, (2.0, 2.0), (3 / 4, 4 / 3), 3)
    assert torch.equal(ours.double(), theirs)


@pytest.mark.parametrize("hw,ratio", [((5, 5), (10.0, 20.0)), ((5, 5), (0.01, 0.05)), ((3, 7), (1e-320, 1e-310)),
                                      ((7, 3), (1e300, 1e308))])
def test_fallback_of_an_extreme_ratio_keeps_a_pixel(hw, ratio, gen):
    # The narrow side rounded to 0 gave an empty box, which the op then refused; torchvision fails there too.
    params = sample_crop_params(hw, 4, (2.0, 2.0), gen, ratio=ratio)
    assert (params.box[:, 2:] >= 1).all() and (params.box[:, 0] + params.box[:, 2] <= hw[0]).all()
    assert (params.box[:, 1] + params.box[:, 3] <= hw[1]).all()
    image = torch.randint(0, 256, (3, *hw), dtype=torch.uint8)
    assert torch.isfinite(seer_kernels.augment_crops(image, params, 4, (0.5,) * 3, (0.25,) * 3)).all()


@pytest.mark.parametrize("hw,scale", [((375, 500), (0.14, 1.0)), ((375, 500), (0.05, 0.14)),
                                      ((600, 200), (0.14, 1.0)), ((31, 23), (0.05, 0.14))])
def test_box_distribution_matches_torchvision(hw, scale, gen):
    ours = sample_crop_params(hw, N, scale, gen).box.double()
    torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
    theirs = _torchvision_boxes(hw, scale, (3 / 4, 4 / 3), 3000)
    bound = _ks_bound(N, 3000)

    def features(b):
        h, w = b[:, 2], b[:, 3]
        return {"area": h * w, "aspect": w / h,
                "center_y": b[:, 0] + h / 2, "center_x": b[:, 1] + w / 2}

    fo, ft = features(ours), features(theirs)
    for k in fo:
        assert _ks(fo[k], ft[k]) <= bound, k


# ---- the other choices -----------------------------------------------------------------------------

def _rate_ok(flags: torch.Tensor, p: float) -> bool:
    n = flags.numel()
    return abs(float(flags.double().mean()) - p) <= 6 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


def test_swav_distributions(gen):
    p = sample_crop_params((375, 500), N, (0.14, 1.0), gen)
    assert _rate_ok(p.flip, 0.5) and _rate_ok(p.jitter, 0.8) and _rate_ok(p.grayscale, 0.2)
    assert _rate_ok(p.blur_sigma > 0, 0.5) and not p.solarize.any()
    f = p.jitter_factors[p.jitter].double()
    assert (f[:, :3] >= 0.2).all() and (f[:, :3] <= 1.8).all() and (f[:, 3].abs() <= 0.2).all()
    for k, (lo, hi) in enumerate([(0.2, 1.8)] * 3 + [(-0.2, 0.2)]):
        mean, sd = (lo + hi) / 2, (hi - lo) / math.sqrt(12)
        assert abs(float(f[:, k].mean()) - mean) <= 6 * sd / math.sqrt(len(f)), k
    assert torch.equal(p.jitter_factors[~p.jitter], torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(int((~p.jitter).sum()), 4))
    sig = p.blur_sigma[p.blur_sigma > 0].double()
    assert (sig >= 0.1).all() and (sig <= 2.0).all()
    assert abs(float(sig.mean()) - 1.05) <= 6 * (1.9 / math.sqrt(12)) / math.sqrt(len(sig))
    # orders: permutations, uniformly distributed (chi-square with 23 degrees of freedom, p ~ 1e-7)
    assert torch.equal(p.jitter_order.sort(1).values, torch.arange(4).expand(N, 4))
    codes = (p.jitter_order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.unique(codes, return_counts=True)[1].double()
    assert len(counts) == 24
    chi2 = float(((counts - N / 24) ** 2 / (N / 24)).sum())
    assert chi2 < 80


def test_options(gen):
    p = sample_crop_params((100, 100), 2000, (0.5, 1.0), gen, flip_p=1.0, jitter_p=1.0, grayscale_p=0.0,
                           blur_p=1.0, blur_sigma=(0.5, 0.7), solarize_p=1.0, jitter_strength=0.5)
    assert p.flip.all() and p.jitter.all() and not p.grayscale.any() and p.solarize.all()
    assert (p.blur_sigma >= 0.5).all() and (p.blur_sigma <= 0.7).all()
    f = p.jitter_factors.double()
    assert (f[:, :3] >= 0.6).all() and (f[:, :3] <= 1.4).all() and (f[:, 3].abs() <= 0.1).all()
    q = sample_crop_params((100, 100), 500, (0.5, 1.0), gen, flip_p=0.0, jitter_p=1.0, brightness=0.0,
                           hue=0.0, blur_p=0.0)
    assert not q.flip.any() and (q.blur_sigma == 0).all()
    assert (q.jitter_factors[:, 0] == 1).all() and (q.jitter_factors[:, 3] == 0).all()
    assert (q.jitter_factors[:, 1] != 1).all()


def test_same_seed_same_params_and_fixed_stream_use():
    a = sample_crop_params((300, 451), 8, (0.14, 1.0), torch.Generator().manual_seed(7))
    b = sample_crop_params((300, 451), 8, (0.14, 1.0), torch.Generator().manual_seed(7))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    c = sample_crop_params((300, 451), 8, (0.14, 1.0), torch.Generator().manual_seed(8))
    assert not torch.equal(a.box, c.box)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sample_crop_params((10, 10), 3, (2.0, 2.0), g1)  # every try fails: the same draws anyway
    torch.rand((3, 36), generator=g2, dtype=torch.float64)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("kw,match", [
    (dict(image_hw=(0, 5)), "'image_hw'"), (dict(image_hw=(5,)), "'image_hw'"), (dict(n=-1), "'n'"),
    (dict(n=2.5), "'n'"), (dict(scale=(0.0, 1.0)), "'scale'"), (dict(scale=(0.5, 0.2)), "'scale'"),
    (dict(ratio=(2.0, 1.0)), "'ratio'"), (dict(flip_p=1.5), "'flip_p'"), (dict(jitter_p=-0.1), "'jitter_p'"),
    (dict(hue=0.6), "'hue'"), (dict(brightness=-1.0), "'brightness'"), (dict(blur_sigma=(0.0, 1.0)), "'blur_sigma'"),
    (dict(solarize_p=True), "'solarize_p'"), (dict(jitter_strength=3.0), "'jitter_strength'"),
    # accepted once, then refused by the op under the name 'params' (or inf factors, NaN reference crops)
    (dict(blur_sigma=(999.0, 2000.0)), "'blur_sigma'"), (dict(brightness=1e39), "'brightness'"),
])
def test_bad_sampler_arguments(kw, match):
    args = dict(image_hw=(10, 10), n=2, scale=(0.1, 1.0), generator=torch.Generator())
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        sample_crop_params(**args)


def test_bad_generator():
    with pytest.raises(TypeError, match="'generator' must be a CPU torch.Generator"):
        sample_crop_params((10, 10), 2, (0.1, 1.0), None)
    with pytest.raises(TypeError, match="unexpected keyword"):
        sample_crop_params((10, 10), 2, (0.1, 1.0), torch.Generator(), bogus=1)


class _CudaGenerator(torch.Generator):
    """Stands for torch.Generator("cuda") on machines without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_a_gpu_generator_is_refused_saying_where_it_is():
    # multicrop said "got Generator", MultiCropSpec.sample the object's repr: neither said what was wrong.
    g = _CudaGenerator()
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    for call in (lambda: seer_kernels.multicrop([image], MultiCropSpec(), g),
                 lambda: MultiCropSpec().sample([(8, 8)], g), lambda: sample_crop_params((8, 8), 2, (0.1, 1.0), g)):
        with pytest.raises(TypeError, match="'generator' must be a CPU torch.Generator, got a torch.Generator on cuda:0"):
            call()
    with pytest.raises(TypeError, match="'generator' must be a CPU torch.Generator, got NoneType"):
        MultiCropSpec().sample([(8, 8)], None)


# ---- CropParams and MultiCropSpec -------------------------------------------------------------------

def test_pack_layout(gen):
    p = sample_crop_params((200, 300), 5, (0.1, 1.0), gen, solarize_p=0.5)
    m = p.pack(image_index=3, reduce=2.0)
    assert m.shape == (5, len(PACK_COLUMNS)) and m.dtype == torch.float32
    assert (m[:, COL["image"]] == 3).all()
    assert torch.equal(m[:, COL["top"]:COL["width"] + 1], p.box.float() / 2)
    assert torch.equal(m[:, COL["flip"]], p.flip.float()) and torch.equal(m[:, COL["solarize"]], p.solarize.float())
    assert torch.equal(m[:, COL["brightness"]:COL["hue"] + 1], p.jitter_factors)
    assert torch.equal(m[:, COL["order0"]:COL["order3"] + 1], p.jitter_order.float())
    assert torch.equal(m[:, COL["sigma"]], p.blur_sigma) and torch.equal(m[:, COL["grayscale"]], p.grayscale.float())


def _windows_float32(box: np.ndarray, reduce: float) -> np.ndarray:
    """The packed windows restated with numpy's float32 (eager only): box / reduce rounded, and where start +
    length passes the rounded end, the largest float32 length that ends at or before it."""
    b = box.astype(np.float64)
    start, length = (b[:, :2] / reduce).astype(np.float32), (b[:, 2:] / reduce).astype(np.float32)
    end = ((b[:, :2] + b[:, 2:]) / reduce).astype(np.float32)
    out = length.copy()
    for i, j in zip(*np.nonzero(start.astype(np.float64) + length.astype(np.float64) > end)):
        out[i, j] = np.float32(float(end[i, j]) - float(start[i, j]))
        while float(start[i, j]) + float(out[i, j]) > float(end[i, j]):
            out[i, j] = np.nextafter(out[i, j], np.float32(0))
    return np.concatenate([start, out], axis=1)


def test_pack_windows_eager_and_compiled_match_float32():
    """Where reduce divides no box, rounding start and length apart can end a window past its box; the
    packing shortens those by ulps. torch.compile traces that numpy code (augment_crops_batch packs in the
    graph): torch 2.11's Inductor folds float64 -> float32 -> float64 into the identity, and a fix-up that
    converted back had ended compiled windows an ulp earlier than eager ones."""
    from seer_kernels.multicrop_params import _windows32
    rng = np.random.default_rng()
    hw = rng.integers(1, 30000, (4000, 2))
    size = rng.integers(1, hw + 1)
    box = np.concatenate([rng.integers(0, hw - size + 1), size], axis=1)
    box[:3] = [[1, 0, 29, 30], [0, 3, 30, 33], [7, 11, 2, 16381]]  # over at reduce 3, and one near 2^14
    for reduce in (1.0, 2.0, 3.0, 3.7, 7.0):
        want = _windows_float32(box, reduce)
        got = _windows32(box, reduce)
        assert got.dtype == np.float32 and np.array_equal(got, want), reduce
        ends = got[:, :2].astype(np.float64) + got[:, 2:]
        assert (ends <= ((box[:, :2] + box[:, 2:]) / reduce).astype(np.float32)).all(), reduce
    torch._dynamo.reset()
    compiled = torch.compile(lambda t, r: torch.from_numpy(_windows32(t.numpy(), r.numpy())), fullgraph=True)
    for reduce in (3.0, 3.7):
        want = _windows_float32(box, reduce)
        assert np.array_equal(compiled(torch.from_numpy(box), torch.tensor(reduce, dtype=torch.float64)).numpy(),
                              want), reduce


def test_crop_params_indexing_and_cat(gen):
    p = sample_crop_params((200, 300), 6, (0.1, 1.0), gen)
    assert len(p[2]) == 1 and torch.equal(p[2].box, p.box[2:3]) and torch.equal(p[-1].box, p.box[-1:])
    q = CropParams.cat([p[:2], p[2:]])
    assert all(torch.equal(getattr(p, f), getattr(q, f)) for f in p.__dataclass_fields__)
    # Any integer type is one crop; out of range raises as a list does (it gave an empty CropParams).
    for i in (np.int64(3), torch.tensor(3), -3):
        assert len(p[i]) == 1 and torch.equal(p[i].box, p.box[3:4]), i
    for i in (6, -7, 100):
        with pytest.raises(IndexError, match=f"index {i} is out of range for 6 crops"):
            p[i]
    with pytest.raises(TypeError, match="got a bool"):
        p[True]
    assert [c.box.tolist() for c in p] == [p.box[i:i + 1].tolist() for i in range(6)]  # iteration stops
    for many in (np.array([0, 2]), np.array([True, False, True, False, False, False]), torch.tensor([0, 2])):
        assert torch.equal(p[many].box, p.box[[0, 2]]), many  # numpy arrays index as tensors do


def test_identity_refuses_fractional_boxes():
    # int64 of a float box truncated it (10.7 -> 10, NaN -> -2^63) without a word.
    assert CropParams.identity([[0.0, 1.0, 10.0, 12.0]]).box.tolist() == [[0, 1, 10, 12]]
    for bad, shown in (([[0, 0, 10.7, 10]], "10.69"), (torch.tensor([[float("nan"), 0, 3, 3]]), "nan")):
        with pytest.raises(ValueError, match=f"argument 'boxes' must hold integers .*got {shown}"):
            CropParams.identity(bad)


def test_multicrop_specs():
    swav, seer = MultiCropSpec.swav(), MultiCropSpec.seer_10b()
    assert [(g.count, g.size, g.scale) for g in swav.groups] == [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))]
    assert [(g.count, g.size, g.scale) for g in seer.groups] == [(2, 160, (0.14, 1.0)), (4, 96, (0.05, 0.14))]
    assert swav.std == SWAV_STD and seer.std == VISSL_STD and MultiCropSpec().std == VISSL_STD
    assert (swav.flip_p, swav.jitter_p, swav.grayscale_p, swav.blur_p, swav.solarize_p) == (0.5, 0.8, 0.2, 0.5, 0.0)
    assert (swav.brightness, swav.contrast, swav.saturation, swav.hue, swav.blur_sigma) == (0.8, 0.8, 0.8, 0.2,
                                                                                             (0.1, 2.0))
    for kw, match in [(dict(groups=()), "'groups'"), (dict(groups=(CropGroup(0, 96, (0.1, 1.0)),)), "count"),
                      (dict(groups=(CropGroup(1, 0, (0.1, 1.0)),)), "size"), (dict(mean=(0.5, 0.5)), "'mean'"),
                      (dict(std=(0.2, 0.0, 0.2)), "'std'"), (dict(hue=0.9), "'hue'"),
                      (dict(out_dtype=torch.int8), "'out_dtype'")]:
        with pytest.raises(ValueError, match=match):
            MultiCropSpec(**kw)


def test_config_defaults_are_the_op_defaults():
    """``data.crops`` (seer.config) and ``MultiCropSpec`` (seer_kernels) each spell out the SwAV defaults: a
    default changed in one place only would make the trainer and the op disagree without a word."""
    from seer.config import CropsConfig
    from seer.data.augment import crop_spec

    assert crop_spec(CropsConfig()) == MultiCropSpec()


def test_seer_10b_recipe_runs(gen):
    image = torch.randint(0, 256, (3, 120, 90), dtype=torch.uint8, generator=gen)
    outs = seer_kernels.multicrop([image, image[:, :70]], MultiCropSpec.seer_10b(), gen)
    assert [tuple(o.shape) for o in outs] == [(4, 3, 160, 160), (8, 3, 96, 96)]


def test_batched_draw_is_the_per_image_draws_in_order(gen):
    # MultiCropSpec.sample draws a whole batch in one torch.rand call; it must equal sample_crop_params
    # called group by group, image by image (the sampler's documented stream contract), and consume the
    # generator exactly as those calls do.
    spec = MultiCropSpec(groups=(CropGroup(2, 64, (0.14, 1.0)), CropGroup(3, 24, (0.05, 0.14)),
                                 CropGroup(1, 32, (0.3, 0.5))), solarize_p=0.3, jitter_p=0.6)
    sizes = [(300, 451), (17, 1000), (64, 64), (5, 3)]  # (5, 3): the fallback box for many tries
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    batched = spec.sample(sizes, g1)
    want = [[None] * len(spec.groups) for _ in sizes]
    for g, group in enumerate(spec.groups):
        for i, hw in enumerate(sizes):
            want[i][g] = sample_crop_params(hw, group.count, group.scale, g2, **spec.sampler_options())
    assert torch.equal(g1.get_state(), g2.get_state())
    for i in range(len(sizes)):
        for g in range(len(spec.groups)):
            a, b = batched[i][g], want[i][g]
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__), (i, g)
    # multicrop draws exactly these parameters.
    images = [torch.randint(0, 256, (3, *hw), dtype=torch.uint8, generator=gen) for hw in sizes]
    _, used = seer_kernels.multicrop(images, spec, torch.Generator().manual_seed(seed), return_params=True)
    assert all(torch.equal(getattr(used[i][g], f), getattr(batched[i][g], f)) for i in range(len(sizes))
               for g in range(len(spec.groups)) for f in CropParams.__dataclass_fields__)


def test_batched_draw_bad_arguments():
    spec = MultiCropSpec.swav()
    for bad in [[], [(10,)], [(10, 0)], [(10.5, 3)], "abc", None]:
        with pytest.raises(ValueError, match="'image_hw'"):
            spec.sample(bad, torch.Generator())
    with pytest.raises(TypeError, match="'generator'"):
        spec.sample([(10, 10)], None)
