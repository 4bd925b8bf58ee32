"""Bad input to the multi-crop ops: a clear exception naming the argument, never a crash or a silent result."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import seer_kernels
from seer_kernels import CropParams, MultiCropSpec, use_backend
from seer_kernels.multicrop_params import COL
from tests.ops.multicrop_oracle import MEAN, STD

IMAGE = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
GOOD = CropParams.identity([[0, 0, 40, 50], [5, 7, 20, 30]])


@pytest.mark.parametrize("image,exc,match", [
    ([[1, 2]], TypeError, "'image' must be a torch.Tensor"),
    (IMAGE.float(), TypeError, "'image' must be uint8"),
    (IMAGE.to(torch.int16), TypeError, "'image' must be uint8"),
    (IMAGE[:2], ValueError, r"'image' must have shape \(3, H, W\)"),
    (torch.zeros(4, 40, 50, dtype=torch.uint8), ValueError, r"'image' must have shape \(3, H, W\)"),
    (IMAGE.permute(1, 2, 0).contiguous(), ValueError, r"'image' must have shape \(3, H, W\)"),
    (IMAGE[0], ValueError, r"'image' must have shape \(3, H, W\)"),
    (torch.zeros(3, 0, 5, dtype=torch.uint8), ValueError, "'image' must be non-empty"),
    (torch.zeros(3, 5, 0, dtype=torch.uint8), ValueError, "'image' must be non-empty"),
])
def test_bad_image(image, exc, match):
    with pytest.raises(exc, match=match):
        seer_kernels.augment_crops(image, GOOD, 16, MEAN, STD)


@pytest.mark.parametrize("box", [[35, 0, 10, 10], [0, 45, 10, 10], [-1, 0, 10, 10], [0, -3, 10, 10],
                                 [0, 0, 41, 50], [0, 0, 40, 51], [39, 49, 2, 2]])
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.ext), "reference"])
def test_box_outside_the_image(box, backend):
    with use_backend(backend, op="multicrop"), pytest.raises(ValueError, match="'params'.* lies outside the image"):
        seer_kernels.augment_crops(IMAGE, CropParams.identity([box]), 16, MEAN, STD)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.ext), "reference"])
def test_boxes_of_narrow_integer_dtypes(dtype, backend):
    # The bounds were computed in the box's own dtype: in uint8, 40 - 41 wrapped to 255 and a box one row
    # taller than the image passed (the reference cropped clamped pixels); a side the dtype cannot hold
    # raised numpy's OverflowError, naming nothing.
    tall = GOOD.replace(box=torch.tensor([[0, 0, 41, 50], [0, 0, 5, 5]], dtype=dtype))
    with use_backend(backend, op="multicrop"), pytest.raises(ValueError, match="'params'.* lies outside the image"):
        seer_kernels.augment_crops(IMAGE, tall, 16, MEAN, STD)
    wide = torch.zeros(3, 2, 40000, dtype=torch.uint8).expand(3, 2, 40000)
    small = GOOD.replace(box=torch.tensor([[0, 0, 2, 2], [1, 5, 1, 7]], dtype=dtype))
    with use_backend(backend, op="multicrop"):
        got = seer_kernels.augment_crops(wide, small, 4, MEAN, STD)
        want = seer_kernels.augment_crops(wide, small.replace(box=small.box.long()), 4, MEAN, STD)
    assert torch.equal(got, want)


@pytest.mark.parametrize("box", [[0, 0, 0, 10], [0, 0, 10, 0], [0, 0, -5, 10]])
def test_empty_box(box):
    with pytest.raises(ValueError, match="'params': every box needs height and width > 0"):
        seer_kernels.augment_crops(IMAGE, CropParams.identity([box]), 16, MEAN, STD)


@pytest.mark.parametrize("size", [0, -1, 2.5, True, "96", 20000])
def test_bad_size(size):
    with pytest.raises(ValueError, match="'size' must be an integer"):
        seer_kernels.augment_crops(IMAGE, GOOD, size, MEAN, STD)


@pytest.mark.parametrize("kw,match", [
    (dict(mean=(0.5, 0.5)), "'mean' must hold 3"), (dict(mean=(0.5,) * 4), "'mean' must hold 3"),
    (dict(std=(0.2, 0.2)), "'std' must hold 3"), (dict(std=(0.2, 0.0, 0.2)), "'std' must hold 3 non-zero"),
    (dict(std=(0.2, 1e-320, 0.2)), "'std' must hold 3 non-zero"),  # 1 / std would be inf in float32
    (dict(mean=(0.5, 1e39, 0.5)), r"'mean' must hold 3 numbers finite in float32 \(\|x\| <= 3.40282e\+38\)"),
    (dict(std=(0.2, -1e39, 0.2)), "'std' must hold 3 non-zero .* finite in float32"),
    (dict(mean=(0.5, float("nan"), 0.5)), "'mean'"), (dict(std=(0.2, 0.2, float("inf"))), "'std'"),
    (dict(mean=0.5), "'mean' must hold 3"), (dict(out_dtype=torch.float64), "'out_dtype'"),
    (dict(out_dtype=torch.uint8), "'out_dtype'"),
])
def test_bad_normalisation_and_dtype(kw, match):
    args = dict(mean=MEAN, std=STD)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        seer_kernels.augment_crops(IMAGE, GOOD, 16, **args)


def test_mean_and_std_as_arrays_and_tensors():
    want = seer_kernels.augment_crops(IMAGE, GOOD, 16, MEAN, STD)
    for kind in (np.asarray, lambda v: torch.tensor(v, dtype=torch.float64)):
        mean, std = kind(MEAN), kind(STD)
        assert torch.equal(seer_kernels.augment_crops(IMAGE, GOOD, 16, mean, std), want)
        spec = MultiCropSpec(mean=mean, std=std)
        assert spec == MultiCropSpec(mean=MEAN, std=STD) and all(type(v) is float for v in spec.mean + spec.std)
    with pytest.raises(ValueError, match="'mean' must hold 3"):
        seer_kernels.augment_crops(IMAGE, GOOD, 16, np.asarray(MEAN)[:2], STD)


@pytest.mark.parametrize("field,value,exc,match", [
    ("box", torch.zeros(2, 3, dtype=torch.int64), ValueError, "field 'box' must have shape"),
    ("box", torch.zeros(2, 4), TypeError, "field 'box' must be a int tensor"),
    ("flip", torch.zeros(2), TypeError, "field 'flip' must be a bool tensor"),
    ("flip", torch.zeros(3, dtype=torch.bool), ValueError, "field 'flip' must have shape"),
    ("jitter_factors", torch.ones(2, 3), ValueError, "field 'jitter_factors' must have shape"),
    ("jitter_order", torch.tensor([[0, 1, 2, 2], [0, 1, 2, 3]]), ValueError, "permutation of 0..3"),
    ("jitter_factors", torch.tensor([[1.0, 1.0, 1.0, 0.7], [1.0, 1.0, 1.0, 0.0]]), ValueError, "hue in"),
    ("jitter_factors", torch.tensor([[-1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]), ValueError, ">= 0"),
    ("blur_sigma", torch.tensor([-0.5, 0.0]), ValueError, "blur_sigma must lie in"),
    ("blur_sigma", torch.tensor([float("nan"), 0.0]), ValueError, "blur_sigma must lie in"),
    ("solarize", [True, False], TypeError, "field 'solarize' must be a torch.Tensor"),
    # finite in float64, inf once packed in float32: the reference computed NaN crops from it
    ("jitter_factors", torch.tensor([[1e39, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.float64), ValueError,
     "finite in float32"),
    ("box", torch.tensor([[2**63 - 1, 0, 2**63 - 1, 5], [0, 0, 5, 5]]), ValueError, "lies outside"),  # wraps
])
def test_bad_params_fields(field, value, exc, match):
    with pytest.raises(exc, match=f"argument 'params': .*{match}"):
        seer_kernels.augment_crops(IMAGE, GOOD.replace(**{field: value}), 16, MEAN, STD)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.ext), "reference"])
def test_params_fields_of_other_float_dtypes_and_with_grad_work(backend):
    bf16 = GOOD.replace(jitter=torch.tensor([True, True]),
                        jitter_factors=torch.tensor([[1.5, 0.5, 1.25, 0.125]] * 2, dtype=torch.bfloat16),
                        blur_sigma=torch.tensor([1.5, 0.0], dtype=torch.bfloat16))
    f32 = bf16.replace(jitter_factors=bf16.jitter_factors.float(), blur_sigma=bf16.blur_sigma.float())
    grad = f32.replace(jitter_factors=f32.jitter_factors.requires_grad_(), blur_sigma=f32.blur_sigma.requires_grad_())
    with use_backend(backend, op="multicrop"):
        want = seer_kernels.augment_crops(IMAGE, f32, 16, MEAN, STD)
        for p in (bf16, grad):
            assert torch.equal(seer_kernels.augment_crops(IMAGE, p, 16, MEAN, STD), want)
    with pytest.raises(TypeError, match="field 'blur_sigma' must be float16, bfloat16, float32 or float64"):
        seer_kernels.augment_crops(IMAGE, GOOD.replace(blur_sigma=torch.zeros(2, dtype=torch.float8_e4m3fn)), 16,
                                   MEAN, STD)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.ext), "reference"])
def test_image_sides_of_2_to_the_24_are_refused_on_every_backend(backend):
    wide = torch.zeros(3, 1, 2**24, dtype=torch.uint8).expand(3, 1, 2**24)
    with use_backend(backend, op="multicrop"), pytest.raises(ValueError, match="'image' sides must be below 2"):
        seer_kernels.augment_crops(wide, CropParams.identity([[0, 0, 1, 5]]), 4, MEAN, STD)


def test_params_must_be_crop_params():
    with pytest.raises(TypeError, match="'params' must be a seer_kernels.CropParams"):
        seer_kernels.augment_crops(IMAGE, GOOD.pack(), 16, MEAN, STD)


def test_bad_batch_arguments():
    other = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    with pytest.raises(TypeError, match="'images' must be a non-empty list"):
        seer_kernels.augment_crops_batch(IMAGE, [GOOD], 16, MEAN, STD)
    with pytest.raises(ValueError, match="'params' must be a list with one entry per image"):
        seer_kernels.augment_crops_batch([IMAGE, other], [GOOD], 16, MEAN, STD)
    with pytest.raises(ValueError, match="'params': every entry must be a list of 2 CropParams"):
        seer_kernels.augment_crops_batch([IMAGE], [GOOD], [16, 8], MEAN, STD)
    with pytest.raises(ValueError, match="'size' must be an integer"):
        seer_kernels.augment_crops_batch([IMAGE], [[GOOD, GOOD]], [16, 0], MEAN, STD)
    with pytest.raises(ValueError, match="the same number of crops for every image"):
        seer_kernels.augment_crops_batch([IMAGE, other], [GOOD, CropParams.identity([[0, 0, 5, 5]])], 16, MEAN, STD)
    with pytest.raises(ValueError, match=r"'params\[1\]'.* lies outside"):
        seer_kernels.augment_crops_batch([IMAGE, other], [GOOD, GOOD], 16, MEAN, STD)
    # Factors above 64 (JPEG draft mode uses 2, 4 and 8) made windows of a sliver of a pixel: refused.
    for r in (0.5, 65, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match=r"'reduce' must hold one factor in \[1, 64\] per image"):
            seer_kernels.augment_crops_batch([IMAGE], [GOOD], 16, MEAN, STD, reduce=[r])
    with pytest.raises(ValueError, match="scaled by 1/reduce.* lies outside image 0"):
        seer_kernels.augment_crops_batch([IMAGE[:, :19, :25]], [GOOD], 16, MEAN, STD, reduce=[2])
    with pytest.raises(ValueError, match="'params': every entry must be a list of 2 CropParams"):
        seer_kernels.augment_crops_batch([IMAGE], [[GOOD]], [16, 8], MEAN, STD)  # was a bare IndexError


@pytest.mark.parametrize("reduce", [3, 5, 6, 7, 2.5, 63.7])
def test_boxes_that_fit_fit_at_any_reduce(reduce):
    # Windows box / reduce rounded to float32 one number at a time used to end an ulp past a box that ends
    # at the image's edge (0.33333334 + 9.666667 > 10), and the op refused it.
    g = torch.Generator().manual_seed(int(reduce * 10))
    for side in torch.randint(5, 70, (20,), generator=g).tolist():
        image = torch.randint(0, 256, (3, side, side + 1), dtype=torch.uint8)
        full_h, full_w = int(side * reduce), int((side + 1) * reduce)  # the size the boxes refer to
        tops = torch.randint(0, full_h // 2, (4,), generator=g).tolist()
        boxes = [[t, t % 7, full_h - t, full_w - t % 7] for t in tops]
        out = seer_kernels.augment_crops_batch([image], [CropParams.identity(boxes)], 8, MEAN, STD,
                                               reduce=[reduce])
        assert out.shape == (4, 3, 8, 8) and torch.isfinite(out).all()


def test_bad_multicrop_arguments():
    g = torch.Generator()
    with pytest.raises(TypeError, match="'images' must be a non-empty list of images, got an empty list"):
        seer_kernels.multicrop([], MultiCropSpec(), g)
    with pytest.raises(TypeError, match=r"non-empty list of images, got a tensor of shape \(0, 3, 5, 5\)"):
        seer_kernels.multicrop(torch.zeros(0, 3, 5, 5, dtype=torch.uint8), MultiCropSpec(), g)
    with pytest.raises(TypeError, match="'spec' must be a seer_kernels.MultiCropSpec"):
        seer_kernels.multicrop([IMAGE], {"groups": 2}, g)
    with pytest.raises(TypeError, match="'generator' must be a CPU torch.Generator"):
        seer_kernels.multicrop([IMAGE], MultiCropSpec(), 0)
    with pytest.raises(ValueError, match=r"'images\[0\]' must have shape"):
        seer_kernels.multicrop([IMAGE[:1]], MultiCropSpec(), g)
    pytest.importorskip("PIL")
    with pytest.raises(ValueError, match="'data' is not an image Pillow can read"):
        seer_kernels.multicrop([b"not a jpeg"], MultiCropSpec(), g)


# ---- the native ops check everything themselves (they may be called directly) ------------------------

def _packed(**cols):
    p = GOOD.pack()
    for name, v in cols.items():
        p[0, COL[name]] = v
    return p


@pytest.mark.ext
@pytest.mark.parametrize("op", ["multicrop_apply", "multicrop_apply_emulated"])
@pytest.mark.parametrize("args,match", [
    (dict(packed=_packed(image=1)), "'params': crop 0: image index 1"),
    (dict(packed=_packed(image=0.5)), "'params': crop 0: image index"),
    (dict(packed=_packed(top=35)), "'params': crop 0: box .* lies outside image 0"),
    # one row or column past the 40 x 50 image (the kernels read the box's pixels: memory safety)
    (dict(packed=_packed(height=41)), "'params': crop 0: box .* lies outside image 0"),
    (dict(packed=_packed(top=1)), "'params': crop 0: box .* lies outside image 0"),
    (dict(packed=_packed(width=50.25)), "'params': crop 0: box .* lies outside image 0"),
    (dict(packed=_packed(left=-0.5)), "'params': crop 0: box"),
    (dict(packed=_packed(height=0)), "'params': crop 0: box .* is empty"),
    (dict(packed=_packed(flip=0.5)), "'params': crop 0: column 5 must be 0 or 1"),
    (dict(packed=_packed(order0=1)), "'params': crop 0: jitter order must be a permutation"),
    (dict(packed=_packed(order2=7)), "'params': crop 0: jitter order must hold op ids"),
    (dict(packed=_packed(hue=0.6)), "'params': crop 0: hue shift"),
    (dict(packed=_packed(saturation=-1)), "'params': crop 0: jitter factor 2"),
    (dict(packed=_packed(sigma=5000)), "'params': crop 0: blur sigma"),
    (dict(packed=_packed(brightness=float("inf"))), "'params': crop 0: column 7 is not finite"),
    (dict(packed=GOOD.pack()[:, :10]), r"'params': expected shape \(n, 18\)"),
    (dict(packed=GOOD.pack().double()), "'params': expected float32"),
    # more crops than a CUDA grid axis holds blocks (the grey means: one block per crop); an expanded view,
    # refused before anything is allocated
    (dict(packed=GOOD.pack()[:1].expand(2**31, 18)), r"'params': expected at most 2147483647 crops \(rows\), "
                                                     "got 2147483648"),
    (dict(images=[]), "'images': expected at least one image"),
    (dict(images=[IMAGE.float()]), "'images': image 0: expected uint8"),
    (dict(images=[IMAGE[:1]]), r"'images': image 0: expected shape \(3, H, W\)"),
    (dict(images=[IMAGE[:, :0]]), "'images': image 0: expected a non-empty image"),
    (dict(size=0), "'size': expected an integer"),
    (dict(mean=[0.5, 0.5]), "'mean': expected 3 values"),
    (dict(std=[0.5, 0.0, 0.5]), "'std': expected non-zero values finite in float32"),
    (dict(std=[0.5, 1e-40, 0.5]), "'std': expected non-zero values finite in float32"),  # 1 / std = inf
    (dict(std=[0.5, 1e39, 0.5]), "'std': expected non-zero values finite in float32"),
    (dict(mean=[0.5, 1e39, 0.5]), "'mean': expected values finite in float32"),  # inf in float32: -inf crops
    (dict(mean=[0.5, float("nan"), 0.5]), "'mean': expected values finite in float32"),
    (dict(dtype=torch.int32), "'out_dtype': expected float32, bfloat16 or float16"),
])
def test_native_ops_check_their_arguments(op, args, match):
    a = dict(images=[IMAGE], packed=GOOD.pack(), size=16, mean=list(MEAN), std=list(STD), dtype=torch.float32)
    a.update(args)
    with pytest.raises(ValueError, match=match):
        getattr(torch.ops.seer_C, op)(a["images"], a["packed"], a["size"], a["mean"], a["std"], a["dtype"])


# ---- the custom op checks everything before dispatch: every backend refuses the same input alike --------

@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.ext), "reference"])
@pytest.mark.parametrize("args,exc,match", [
    (dict(images=[]), ValueError, "'images' must be a non-empty list"),
    (dict(images=[IMAGE.float()]), TypeError, r"'images\[0\]' must be uint8"),
    (dict(images=[torch.zeros(4, 40, 50, dtype=torch.uint8)]), ValueError, r"'images\[0\]' must have shape"),
    (dict(packed=_packed(image=0.5)), ValueError, r"'params': crop 0: the image index must be an integer in \[0, 1\)"),
    (dict(packed=_packed(image=1)), ValueError, "'params': crop 0: the image index"),
    (dict(packed=_packed(width=51)), ValueError, "'params': crop 0: the box .* lies outside image 0 of size 40x50"),
    (dict(packed=_packed(top=-3)), ValueError, "'params': crop 0: the box .* lies outside"),
    (dict(packed=_packed(height=0)), ValueError, "'params': crop 0: the box .* must have height and width > 0"),
    (dict(packed=_packed(sigma=float("nan"))), ValueError, "'params': crop 0: every value must be finite"),
    (dict(packed=_packed(jitter=1, order0=7)), ValueError, "'params': crop 0: the jitter order must be a permutation"),
    (dict(packed=_packed(flip=0.5)), ValueError, "'params': crop 0: flip must be 0 or 1"),
    (dict(packed=_packed(hue=0.6)), ValueError, "'params': crop 0: the jitter factors"),
    (dict(packed=_packed(saturation=-1)), ValueError, "'params': crop 0: the jitter factors"),
    (dict(packed=_packed(sigma=5000)), ValueError, "'params': crop 0: the blur sigma"),
    (dict(packed=GOOD.pack().double()), ValueError, "'params' must be a float32 CPU tensor of shape"),
    (dict(packed=GOOD.pack()[:, :10]), ValueError, "'params' must be a float32 CPU tensor of shape"),
    (dict(size=0), ValueError, "'size' must be an integer"),
    (dict(size=-3), ValueError, "'size' must be an integer"),
    (dict(mean=[0.5, 0.5]), ValueError, "'mean' must hold 3"),
    (dict(std=[0.0, 1.0, 1.0]), ValueError, "'std' must hold 3 non-zero"),
    (dict(dtype=torch.int32), ValueError, "'out_dtype' must be"),
])
def test_custom_op_checks_its_arguments_on_every_backend(backend, args, exc, match):
    """torch.ops.seer.multicrop_apply checks before it dispatches: the reference backend returned
    uninitialised memory for a fractional image index, NaN for a box outside the image, an empty tensor for
    size 0, and took an invalid jitter order, float64 params and an int32 out_dtype."""
    a = dict(images=[IMAGE], packed=GOOD.pack(), size=16, mean=list(MEAN), std=list(STD), dtype=torch.float32)
    a.update(args)
    with use_backend(backend, op="multicrop"), pytest.raises(exc, match=f"seer::multicrop_apply: .*{match}"):
        torch.ops.seer.multicrop_apply(a["images"], a["packed"], a["size"], a["mean"], a["std"], a["dtype"])
