"""seer_kernels.augment_crops / augment_crops_batch / multicrop against torchvision.transforms.v2 (float path),
on real photos, for every backend that can run here (the CUDA stages through their CPU emulation)."""
from __future__ import annotations

import pytest
import torch

import seer_kernels
from seer_kernels import CropGroup, CropParams, MultiCropSpec, use_backend
from tests.ops.multicrop_oracle import (EXACT, MEAN, STD, apply, assert_within_tolerance, crops, photos,
                                        random_params, torchvision_crops)


def backend_params(cuda: bool = True):
    out = [pytest.param("cpp", "cpu", marks=pytest.mark.ext, id="cpp"),
           pytest.param("reference", "cpu", id="reference"),
           pytest.param("emulated", "cpu", marks=pytest.mark.ext, id="cuda-stages-emulated")]
    if cuda:
        out += [pytest.param("cuda", "cuda", marks=[pytest.mark.cuda, pytest.mark.ext], id="cuda"),
                pytest.param("reference", "cuda", marks=pytest.mark.cuda, id="reference-cuda")]
    return out


def special_boxes(h: int, w: int, size: int) -> torch.Tensor:
    """Boxes at the image borders and corners, the whole image, single pixels and rows, and boxes smaller
    than the output (upsampling), plus one in the middle."""
    bh, bw = max(1, h // 3), max(1, w // 4)
    small_h, small_w = max(1, min(h, size // 3)), max(1, min(w, size // 2 + 1))
    return torch.tensor([
        [0, 0, h, w], [0, 0, bh, bw], [h - bh, w - bw, bh, bw], [0, w - bw, h, bw], [h - 1, 0, 1, w],
        [h - 1, w - 1, 1, 1], [0, 0, 1, 1], [(h - small_h) // 2, (w - small_w) // 2, small_h, small_w],
        [h - small_h, 0, small_h, small_w], [h // 5, w // 7, max(1, h // 2), max(1, w // 3)]])


# ---- against torchvision ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("size", [96, 37])
def test_resized_crop_at_borders_and_upsampling(backend, device, size, poison_empty):
    for name, image in photos().items():
        h, w = image.shape[1:]
        params = CropParams.identity(special_boxes(h, w, size))
        got = crops(backend, image, params, size, device)
        assert got.shape == (len(params), 3, size, size) and got.device.type == device
        assert_within_tolerance(got, torchvision_crops(image, params, size), what=f"{name} {backend}")


STAGES = ["flip", "brightness", "contrast", "saturation", "hue", "grayscale", "blur", "solarize", "normalize"]


def single_stage(stage: str, box: torch.Tensor, gen: torch.Generator) -> CropParams:
    """Random crops with exactly one stage switched on, with random strength."""
    n = box.shape[0]
    p = CropParams.identity(box)
    u = torch.rand(n, generator=gen)
    if stage == "flip":
        return p.replace(flip=torch.ones(n, dtype=torch.bool))
    if stage in ("brightness", "contrast", "saturation", "hue"):
        op = ["brightness", "contrast", "saturation", "hue"].index(stage)
        f = p.jitter_factors.clone()
        f[:, op] = (u - 0.5) * 0.98 if stage == "hue" else u * 1.8 + 0.1
        return p.replace(jitter=torch.ones(n, dtype=torch.bool), jitter_factors=f)
    if stage == "grayscale":
        return p.replace(grayscale=torch.ones(n, dtype=torch.bool))
    if stage == "blur":
        return p.replace(blur_sigma=0.1 + 2.9 * u)
    if stage == "solarize":
        return p.replace(solarize=torch.ones(n, dtype=torch.bool))
    return p  # normalize: random mean and std below


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_matches_torchvision(backend, device, stage, gen, poison_empty):
    mean = tuple((torch.rand(3, generator=gen) * 0.6 + 0.2).tolist())
    std = tuple((torch.rand(3, generator=gen) * 0.4 + 0.1).tolist())
    for name in ("astronaut", "chelsea_portrait", "tiny"):
        image = photos()[name]
        params = single_stage(stage, random_params(tuple(image.shape[1:]), 3, (0.05, 1.0), gen).box, gen)
        got = crops(backend, image, params, 53, device, mean=mean, std=std)
        want = torchvision_crops(image, params, 53, mean, std)
        assert_within_tolerance(got, want, std, what=f"{stage} on {name} ({backend})")


@pytest.mark.parametrize("backend,device", backend_params())
def test_random_pipelines_match_torchvision(backend, device, gen, poison_empty):
    # SwAV's distributions plus solarize; the emulation of the CUDA stages is slow, so fewer crops there.
    n = 2 if backend == "emulated" else 4
    for name, image in photos().items():
        for size, scale in ((224, (0.14, 1.0)), (96, (0.05, 0.14)), (37, (0.01, 1.0))):
            params = random_params(tuple(image.shape[1:]), n, scale, gen, solarize_p=0.5)
            got = crops(backend, image, params, size, device)
            assert_within_tolerance(got, torchvision_crops(image, params, size), what=f"{name} {size} {backend}")


def _guarded(image: torch.Tensor, hwc: bool) -> torch.Tensor:
    """A view of ``image`` inside a larger buffer of 255s (planar, or an HWC array's channels-last view):
    a read past any edge of the image pulls 255s into the crop."""
    c, h, w = image.shape
    if hwc:
        big = torch.full((h + 4, w + 4, c), 255, dtype=torch.uint8)
        big[2:2 + h, 2:2 + w] = image.permute(1, 2, 0)
        return big[2:2 + h, 2:2 + w].permute(2, 0, 1)
    big = torch.full((c, h + 4, w + 4), 255, dtype=torch.uint8)
    big[:, 2:2 + h, 2:2 + w] = image
    return big[:, 2:2 + h, 2:2 + w]


@pytest.mark.ext
@pytest.mark.parametrize("backend", ["cpp", "emulated"])
@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (9, 1), (5, 3)])
def test_tiny_images_fractional_windows_and_guarded_views(backend, hw, gen, poison_empty):
    """1-pixel images, rows and columns; whole-image, corner and fractional (draft-decoded) windows touching
    the borders; outputs of 1 pixel and upsampled ones; a blur radius far beyond the crop (reflection folds
    again); every crop read from views inside a 255 border, so that no tap may reach past the image."""
    h, w = hw
    image = torch.randint(0, 200, (3, h, w), generator=gen, dtype=torch.uint8)
    windows = [[0, 0, h, w], [h - 1, w - 1, 1, 1], [0.25, 0.5, h - 0.5, w - 0.75], [h - 0.25, w - 0.125, 0.25, 0.125]]
    packed = CropParams.identity([[0, 0, 1, 1]] * len(windows)).pack().repeat(2, 1)
    packed[:, 1:5] = torch.tensor(windows, dtype=torch.float32).repeat(2, 1)
    packed[1::2, 5] = 1                                    # flip
    packed[:, 6], packed[:, 7], packed[:, 8] = 1, 1.3, 0.6  # brightness and contrast
    packed[::3, 15] = 1                                    # grayscale
    packed[:4, 16], packed[4:, 16] = 0.7, 1000.0           # blur sigma
    for size in (1, 5):
        want = apply("reference", [image], packed, size)
        for hwc in (False, True):
            got = apply(backend, [_guarded(image, hwc)], packed, size)
            assert float((got - want).abs().max()) <= EXACT / min(STD), f"size {size} hwc {hwc}"


@pytest.mark.ext
@pytest.mark.parametrize("backend", ["cpp", "emulated"])
def test_windows_narrower_than_float32_resolution(backend, gen, poison_empty):
    """Windows below half a float32 ulp of their start (a box divided by a large reduce): at an integer start,
    start + width rounds to start (the range of source columns came out empty: out-of-bounds reads, or the
    previous crop's scratch row on the same thread); at a fractional one, every tap's coverage rounds to 0
    (0 / 0 weights, NaN crops). The float64 reference takes the pixel that holds the window; so must we.
    Each narrow crop follows a whole-image one, so that a thread meets it with its scratch already used."""
    image = torch.randint(0, 256, (3, 8, 1001), generator=gen, dtype=torch.uint8)
    narrow = [[2, 5, 3, 1e-7], [1, 5.5, 4, 1e-8], [0, 1000, 3, 2.0**-16], [1, 1000.5, 3, 7.5e-9],
              [5, 7, 1e-7, 3], [4.5, 3, 1e-8, 2]]
    windows = [w for n in narrow for w in ([0, 0, 8, 1001], n)]
    packed = CropParams.identity([[0, 0, 1, 1]] * len(windows)).pack()
    packed[:, 1:5] = torch.tensor(windows, dtype=torch.float64).float()
    for size in (1, 4):
        want = apply("reference", [image], packed, size)
        got = apply(backend, [image], packed, size)
        assert torch.isfinite(got).all(), f"size {size}: NaN crops {torch.isnan(got).flatten(1).any(1).nonzero()}"
        assert float((got - want).abs().max()) <= EXACT / min(STD), f"size {size}"


@pytest.mark.parametrize("backend,device", backend_params())
def test_windows_narrower_than_any_coverage_take_their_pixel(backend, device, gen, poison_empty):
    """Widths that the op accepts (positive, finite) but that no coverage can represent: below float64
    resolution at a fractional start (the reference's coverages were all 0: NaN crops), or subnormal in
    float32 (the kernels' coverage times the triangle underflowed to 0: NaN crops). Such a window lies inside
    one pixel, so every output pixel of a window narrow in both axes is that source pixel, normalised."""
    image = torch.randint(0, 256, (3, 8, 9), generator=gen, dtype=torch.uint8)
    cases = {  # (top, left, height, width) -> the source pixel (y, x) of a window narrow in both axes
        (1.0, 2.5, 1e-30, 1e-30): (1, 2), (3.0, 2.0, 1e-45, 1e-45): (3, 2), (5.25, 7.0, 1e-41, 2.0**-70): (5, 7),
        (0.0, 8.5, 1e-44, 1e-30): (0, 8), (7.0, 0.0, 2.0**-65, 1e-39): (7, 0)}
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    for (top, left, h, w), (y, x) in cases.items():
        for wide in ("none", "height", "width"):  # also with the other axis resampled over several pixels
            box = [top, left, 3.0 if wide == "height" else h, 3.0 if wide == "width" else w]
            if wide == "height" and top + 3 > 8 or wide == "width" and left + 3 > 9:
                continue
            packed = CropParams.identity([[0, 0, 1, 1]]).pack()
            packed[0, 1:5] = torch.tensor(box, dtype=torch.float64).float()
            for size in (1, 4):
                got = apply(backend, [image.to(device)], packed, size)[0].cpu()
                assert torch.isfinite(got).all(), f"{box} size {size}: NaN crops"
                if wide == "none":
                    want = ((image[:, y, x].float() / 255)[:, None, None] - mean) / std
                    assert float((got - want).abs().max()) <= EXACT / min(STD), f"{box} size {size}"
                else:
                    want = apply("reference", [image], packed, size)[0]
                    assert float((got - want).abs().max()) <= EXACT / min(STD), f"{box} size {size}"


# ---- properties of the op ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_is_the_rounded_float32_output(backend, device, dtype, gen, poison_empty):
    image = photos()["coffee"]
    params = random_params(tuple(image.shape[1:]), 4, (0.05, 1.0), gen, solarize_p=0.5)
    f32 = crops(backend, image, params, 40, device)
    low = crops(backend, image, params, 40, device, out_dtype=dtype)
    assert low.dtype == dtype
    assert torch.equal(low, f32.to(dtype))


@pytest.mark.parametrize("backend,device", backend_params())
def test_low_precision_output_rounds_ties_to_even(backend, device):
    """The cast rounds to nearest, ties to even, as torch's .to() does. Random crops hold few ties (1 value in
    65536 for bfloat16: a cast rounding them half-up passed the test above); here every value is one: black
    pixels with std 1 and mean -t give exactly t, for t halfway between two neighbours of the dtype whose
    lower one is even, then odd, then the first negated (and float16's subnormal ties)."""
    image = torch.zeros(3, 6, 7, dtype=torch.uint8)
    params = CropParams.identity([[0, 0, 6, 7], [1, 2, 3, 4]])
    cases = [(torch.bfloat16, 1.0, 2.0**-7), (torch.float16, 1.0, 2.0**-10), (torch.float16, 0.0, 2.0**-24)]
    for dtype, base, ulp in cases:
        ties = (base + ulp / 2, base + 1.5 * ulp, -(base + ulp / 2))
        mean, std = tuple(-t for t in ties), (1.0, 1.0, 1.0)
        f32 = crops(backend, image, params, 5, device, mean=mean, std=std).cpu()
        assert torch.equal(f32, torch.tensor(ties).view(1, 3, 1, 1).expand_as(f32))  # exact in float32
        low = crops(backend, image, params, 5, device, mean=mean, std=std, out_dtype=dtype).cpu()
        want = torch.tensor([base, base + 2 * ulp, -base]).view(1, 3, 1, 1).expand_as(low)
        assert low.dtype == dtype and torch.equal(low.float(), want), (dtype, base)


@pytest.mark.parametrize("backend,device", backend_params())
def test_memory_layouts_give_the_same_crops(backend, device, gen):
    image = photos()["rocket"]
    hwc = image.permute(1, 2, 0).contiguous()
    big = torch.zeros(3, 500, 700, dtype=torch.uint8)
    big[:, 30:457, 40:680] = image
    layouts = {
        "channels-last view of an HWC array": hwc.permute(2, 0, 1),
        "view inside a larger image": big[:, 30:457, 40:680],
        "transposed twice (arbitrary strides)": image.transpose(1, 2).contiguous().transpose(1, 2),
    }
    params = random_params(tuple(image.shape[1:]), 4, (0.05, 1.0), gen)
    want = crops(backend, image, params, 48, device)
    for name, view in layouts.items():
        # planar and interleaved rows take different vector loops (FMA contraction): rounding only
        assert float((crops(backend, view, params, 48, device) - want).abs().max()) <= 1e-5, name


@pytest.mark.parametrize("backend,device", backend_params())
def test_several_images_in_one_call(backend, device, gen, poison_empty):
    names = ["astronaut", "strip", "tiny", "coffee"]
    images = [photos()[k].to(device) for k in names]
    per_image = [random_params(tuple(im.shape[1:]), 3, (0.05, 1.0), gen) for im in images]
    packed = torch.cat([p.pack(i) for i, p in enumerate(per_image)])
    perm = torch.randperm(packed.shape[0], generator=gen)  # rows in any order
    got = apply(backend, images, packed[perm], 40)
    want = torch.cat([torchvision_crops(photos()[k], p, 40) for k, p in zip(names, per_image)])[perm]
    assert_within_tolerance(got, want, what=backend)


@pytest.mark.ext
def test_deterministic_and_independent_of_thread_count(gen):
    image = photos()["astronaut"]
    params = random_params(tuple(image.shape[1:]), 8, (0.05, 1.0), gen)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = seer_kernels.augment_crops(image, params, 96, MEAN, STD)
        torch.set_num_threads(max(2, prev))
        b = seer_kernels.augment_crops(image, params, 96, MEAN, STD)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a, b)


def test_augment_crops_batch_is_crop_major(gen):
    images = [photos()[k] for k in ("astronaut", "chelsea_portrait", "tiny")]
    params = [random_params(tuple(im.shape[1:]), 3, (0.05, 1.0), gen) for im in images]
    out = seer_kernels.augment_crops_batch(images, params, 32, MEAN, STD)
    assert out.shape == (9, 3, 32, 32)
    view = out.view(3, 3, 3, 32, 32)  # (crop, image, ...)
    for i, (image, p) in enumerate(zip(images, params)):
        single = seer_kernels.augment_crops(image, p, 32, MEAN, STD)
        for v in range(3):
            assert torch.equal(view[v, i], single[v])


def test_augment_crops_batch_by_resolution(gen):
    images = [photos()[k] for k in ("coffee", "strip")]
    params = [[random_params(tuple(im.shape[1:]), n, scale, gen) for n, scale in ((2, (0.14, 1.0)), (3, (0.05, 0.14)))]
              for im in images]
    outs = seer_kernels.augment_crops_batch(images, params, [48, 24], MEAN, STD)
    assert [tuple(o.shape) for o in outs] == [(4, 3, 48, 48), (6, 3, 24, 24)]
    for g, size in enumerate((48, 24)):
        single = seer_kernels.augment_crops_batch(images, [p[g] for p in params], size, MEAN, STD)
        assert torch.equal(outs[g], single)


def test_empty_crop_list():
    image = photos()["tiny"]
    out = seer_kernels.augment_crops(image, CropParams.identity(torch.zeros(0, 4)), 16, MEAN, STD)
    assert out.shape == (0, 3, 16, 16)


# ---- multicrop --------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [MultiCropSpec.swav(), MultiCropSpec.seer_10b()], ids=["swav", "seer10b"])
def test_multicrop_recipes_and_determinism(spec, gen):
    images = [photos()[k] for k in ("coffee", "chelsea_portrait", "astronaut")]
    seed = int(torch.randint(0, 2**62, ()))
    outs, params = seer_kernels.multicrop(images, spec, torch.Generator().manual_seed(seed), return_params=True)
    assert [tuple(o.shape) for o in outs] == [(g.count * 3, 3, g.size, g.size) for g in spec.groups]
    again = seer_kernels.multicrop(images, spec, torch.Generator().manual_seed(seed))
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    other = seer_kernels.multicrop(images, spec, torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(outs[0], other[0])
    # Each tensor is crop-major and equals torchvision with the returned parameters.
    for g, group in enumerate(spec.groups):
        view = outs[g].view(group.count, len(images), 3, group.size, group.size)
        for i, image in enumerate(images):
            want = torchvision_crops(image, params[i][g], group.size, spec.mean, spec.std)
            assert_within_tolerance(view[:, i], want, spec.std, what=f"group {g} image {i}")


def test_multicrop_accepts_jpeg_bytes_and_batched_tensors():
    from tests.ops.multicrop_oracle import jpeg_bytes

    spec = MultiCropSpec(groups=(CropGroup(2, 64, (0.14, 1.0)), CropGroup(3, 24, (0.05, 0.14))))
    images = [photos()[k] for k in ("coffee", "rocket")]
    encoded = [jpeg_bytes(im) for im in images]
    decoded = [seer_kernels.decode.decode_image(b)[0] for b in encoded]
    a = seer_kernels.multicrop(encoded, spec, torch.Generator().manual_seed(3))
    b = seer_kernels.multicrop(decoded, spec, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    stacked = torch.stack([photos()["coffee"], photos()["coffee"]])
    c = seer_kernels.multicrop(stacked, spec, torch.Generator().manual_seed(3))
    d = seer_kernels.multicrop(list(stacked), spec, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(c, d))


# ---- torch.library ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", [pytest.param("cpp", "cpu", marks=pytest.mark.ext), ("reference", "cpu"),
                                            pytest.param("cuda", "cuda", marks=[pytest.mark.cuda, pytest.mark.ext])])
def test_opcheck(backend, device, gen):
    images = [photos()["tiny"].to(device), photos()["strip"][:, :, :50].to(device)]
    packed = torch.cat([random_params(tuple(im.shape[1:]), 2, (0.1, 1.0), gen).pack(i) for i, im in enumerate(images)])
    with use_backend(backend, op="multicrop"):
        torch.library.opcheck(torch.ops.seer.multicrop_apply.default,
                              (images, packed, 12, list(MEAN), list(STD), torch.float32))


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.ext), "reference"])
def test_op_gives_constants_for_params_that_require_grad(backend, gen):
    """The crops take no gradient (pixels and drawn parameters): a params matrix that requires grad gives
    constant crops. torch gave them a grad_fn whose backward raised 'no autograd formula was registered', so
    opcheck failed on such input, and empty crop lists and single crops trace alike."""
    images = [photos()["tiny"], photos()["strip"][:, :, :50]]
    packed = torch.cat([random_params(tuple(im.shape[1:]), 2, (0.1, 1.0), gen).pack(i) for i, im in enumerate(images)])
    with use_backend(backend, op="multicrop"):
        for p in (packed, packed[:1], packed[:0]):
            args = (images, p.clone().requires_grad_(), 7, list(MEAN), list(STD), torch.float32)
            assert not torch.ops.seer.multicrop_apply(*args).requires_grad
            torch.library.opcheck(torch.ops.seer.multicrop_apply.default, args)

@pytest.mark.ext
@pytest.mark.parametrize("name", ["multicrop_apply", "multicrop_apply_emulated"])
def test_native_ops_have_fake_kernels(name, gen):
    """The private seer_C ops trace like the public one: FakeTensor and meta tensors get the kernel's (N, 3,
    size, size) in out_dtype, contiguous, on the images' device, opcheck passes, and the fake refuses a bad
    argument with the kernel's message (the crops themselves are data: checked when the kernel runs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    op = getattr(torch.ops.seer_C, name).default
    images = [photos()["tiny"], photos()["strip"][:, :, :50]]
    packed = torch.cat([random_params(tuple(im.shape[1:]), 2, (0.1, 1.0), gen).pack(i) for i, im in enumerate(images)])
    args = (images, packed, 12, list(MEAN), list(STD), torch.bfloat16)
    torch.library.opcheck(op, args)
    real = op(*args)
    short = packed[:, :17].contiguous()
    many = packed[:1].expand(2**31, 18)  # more crops than a CUDA grid axis holds blocks (a view: no memory)
    with FakeTensorMode() as mode:
        fake = op([mode.from_tensor(im) for im in images], mode.from_tensor(packed), *args[2:])
        assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
        with pytest.raises(ValueError, match="argument 'out_dtype': expected float32, bfloat16 or float16, "
                                             "got Double"):
            op([mode.from_tensor(images[0])], mode.from_tensor(packed), 12, list(MEAN), list(STD), torch.float64)
        with pytest.raises(ValueError, match=r"argument 'params': expected shape \(n, 18\), got \[4, 17\]"):
            op([mode.from_tensor(images[0])], mode.from_tensor(short), 12, list(MEAN), list(STD), torch.float32)
        with pytest.raises(ValueError, match=r"argument 'params': expected at most 2147483647 crops \(rows\), "
                                             "got 2147483648"):
            op([mode.from_tensor(images[0])], mode.from_tensor(many), 12, list(MEAN), list(STD), torch.float32)
    meta = op([im.to("meta") for im in images], packed.to("meta"), *args[2:])
    assert (meta.shape, meta.dtype, meta.device.type) == (real.shape, real.dtype, "meta")


def test_compiles_fullgraph(gen):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=False)
    def batch(image, packed):
        return torch.ops.seer.multicrop_apply([image], packed, 20, list(MEAN), list(STD), torch.bfloat16).float() * 2

    image = photos()["tiny"]
    packed = random_params(tuple(image.shape[1:]), 3, (0.1, 1.0), gen).pack()
    want = torch.ops.seer.multicrop_apply([image], packed, 20, list(MEAN), list(STD), torch.bfloat16).float() * 2
    assert torch.equal(batch(image, packed), want)


@pytest.mark.parametrize("reduce", [1, 3])
def test_augment_crops_batch_compiles_fullgraph(reduce, gen):
    """What multicrop's fullgraph refusal tells the user to compile: augment_crops_batch with parameters drawn
    outside. Its packing (numpy, traced by Dynamo) branched on data (the float32 window fix-up) and broke
    fullgraph=True for every input; reduce 3 takes that fix-up (box (1, 0, 29, 30): 0.33333334 + 9.666667 > 10).
    Torch 2.11's Inductor folds a float64 -> float32 -> float64 round trip into the identity: the fix-up had
    used one and ended a compiled window an ulp earlier than eager there (the packing now has none)."""
    torch._dynamo.reset()
    f = torch.compile(lambda ims, ps: seer_kernels.augment_crops_batch(ims, ps, 16, MEAN, STD, reduce=[reduce] * 2),
                      fullgraph=True)
    images = [torch.randint(0, 256, (3, 10, 12), generator=gen, dtype=torch.uint8) for _ in range(2)]
    boxes = [[1, 0, 29, 30], [0, 3, 30, 33]] if reduce == 3 else [[1, 0, 9, 10], [0, 3, 10, 9]]
    params = [CropParams.identity(boxes), random_params((10 * reduce, 12 * reduce), 2, (0.2, 1.0), gen)]
    want = seer_kernels.augment_crops_batch(images, params, 16, MEAN, STD, reduce=[reduce] * 2)
    assert torch.equal(f(images, params), want)


def test_multicrop_under_compile_runs_eagerly_or_says_why(gen):
    # The sampler and decoder are host code (numpy, Pillow): a plain compile runs them eagerly, with the
    # draws eager gives; fullgraph refuses with a message that says what to compile instead.
    torch._dynamo.reset()
    image, spec = photos()["tiny"], seer_kernels.MultiCropSpec(groups=(seer_kernels.CropGroup(2, 16, (0.2, 1.0)),))
    want = seer_kernels.multicrop([image], spec, torch.Generator().manual_seed(3))
    got = torch.compile(lambda im, g: seer_kernels.multicrop([im], spec, g))(image, torch.Generator().manual_seed(3))
    assert torch.equal(got[0], want[0])
    import inspect
    says_why = "reason" in inspect.signature(torch.compiler.disable).parameters  # newer torch only
    with pytest.raises(Exception, match="multicrop draws the crop parameters with numpy" if says_why else "disable"):
        torch.compile(lambda im, g: seer_kernels.multicrop([im], spec, g), fullgraph=True)(image, gen)


# ---- the CUDA kernels (run by bench/gpu_check.sh) ---------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.ext
@pytest.mark.parametrize("size", [224, 96, 37])
def test_cuda_matches_the_cpu_kernel(size, gen, poison_empty):
    """Needs only torch (the GPU machine has no torchvision): the CUDA kernels against the C++ CPU kernel,
    which the CPU suite checks against torchvision, on border and upsampling boxes, every single stage and
    random pipelines."""
    for name, image in photos().items():
        h, w = image.shape[1:]
        boxes = random_params((h, w), len(STAGES), (0.01, 1.0), gen).box
        params = CropParams.cat([CropParams.identity(special_boxes(h, w, size)),
                                 random_params((h, w), 6, (0.01, 1.0), gen, solarize_p=0.5)]
                                + [single_stage(stage, boxes[i:i + 1], gen) for i, stage in enumerate(STAGES)])
        got = crops("cuda", image, params, size, "cuda")
        want = crops("cpp", image, params, size, "cpu")
        assert_within_tolerance(got, want, what=f"{name} cuda vs cpp")


@pytest.mark.cuda
@pytest.mark.ext
def test_cuda_is_deterministic_and_matches_its_cpu_emulation(gen):
    images = [photos()[k] for k in ("astronaut", "strip", "tiny", "china")]
    packed = torch.cat([random_params(tuple(im.shape[1:]), 4, (0.05, 1.0), gen, solarize_p=0.5).pack(i)
                        for i, im in enumerate(images)])
    on_gpu = [im.cuda() for im in images]
    a = apply("cuda", on_gpu, packed, 64)
    b = apply("cuda", on_gpu, packed, 64)
    assert torch.equal(a, b)
    emulated = apply("emulated", images, packed, 64)
    assert float((a.cpu() - emulated).abs().max()) <= EXACT / min(STD)


@pytest.mark.cuda
@pytest.mark.ext
def test_cuda_multicrop_batch_matches_cpu(gen):
    images = [photos()[k] for k in ("coffee", "chelsea_portrait", "rocket", "tiny")]
    spec = MultiCropSpec.swav(out_dtype=torch.bfloat16)
    seed = int(torch.randint(0, 2**62, ()))
    gpu = seer_kernels.multicrop([im.cuda() for im in images], spec, torch.Generator().manual_seed(seed))
    cpu = seer_kernels.multicrop(images, spec, torch.Generator().manual_seed(seed))
    for g, c in zip(gpu, cpu):
        assert g.device.type == "cuda" and g.dtype == torch.bfloat16
        # bf16 rounding of values that differ by float rounding may differ by one bf16 step
        assert float((g.cpu().float() - c.float()).abs().max()) <= 2 ** -6


@pytest.mark.cuda
@pytest.mark.ext
def test_cuda_rejects_a_box_outside_the_image_before_launching():
    image = photos()["tiny"].cuda()
    packed = CropParams.identity([[0, 0, 24, 10]]).pack()  # 24 rows > 23
    with pytest.raises(ValueError, match="argument 'params': crop 0: box"):
        torch.ops.seer_C.multicrop_apply([image], packed, 8, list(MEAN), list(STD), torch.float32)
    torch.cuda.synchronize()


def test_reference_ignores_the_callers_autocast(gen):
    # Under autocast the reference's matmuls would run in bfloat16; its output must not change.
    image = torch.randint(0, 256, (3, 61, 83), dtype=torch.uint8, generator=gen)
    params = seer_kernels.sample_crop_params((61, 83), 5, (0.05, 1.0), gen)
    with use_backend("reference", op="multicrop"):
        want = seer_kernels.augment_crops(image, params, 24, MEAN, STD)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = seer_kernels.augment_crops(image, params, 24, MEAN, STD)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.ext
def test_cuda_contrast_mean_of_a_large_crop_matches_the_cpu_kernel():
    """Contrast blends towards the grey mean of all S^2 pixels; the CUDA block reduction sums S^2 / 256
    values per thread (65536 here), which in float32 drifts by ~1e-3 relative on a flat image."""
    image = torch.full((3, 8, 8), 128, dtype=torch.uint8)
    params = CropParams.identity([[0, 0, 8, 8]]).replace(
        jitter=torch.ones(1, dtype=torch.bool), jitter_factors=torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    got = crops("cuda", image, params, 4096, "cuda")
    want = crops("cpp", image, params, 4096, "cpu")
    assert float((got.cpu() - want).abs().max()) <= EXACT / min(STD)


@pytest.mark.cuda
@pytest.mark.ext
def test_cuda_runs_on_the_current_stream(gen):
    """The image is written on a side stream behind a long sleep: launched on any other stream, the
    kernels would read it before it is written."""
    image = photos()["coffee"]
    params = random_params(tuple(image.shape[1:]), 4, (0.05, 1.0), gen, solarize_p=0.5)
    want = crops("cpp", image, params, 48, "cpu")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        on_gpu = torch.zeros(image.shape, dtype=torch.uint8, device="cuda")
        torch.cuda._sleep(200_000_000)
        on_gpu.copy_(image.pin_memory(), non_blocking=True)
        got = crops("cuda", on_gpu, params, 48, "cuda")
    side.synchronize()
    assert_within_tolerance(got, want, what="cuda on a side stream vs cpp")


@pytest.mark.cuda
@pytest.mark.ext
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_images_on_the_second_device(gen):
    """Device guard: images on cuda:1 while cuda:0 is current (scratch, tables and launches on cuda:1)."""
    images = [photos()[k] for k in ("tiny", "strip")]
    packed = torch.cat([random_params(tuple(im.shape[1:]), 3, (0.05, 1.0), gen, solarize_p=0.5).pack(i)
                        for i, im in enumerate(images)])
    with torch.cuda.device(0):
        got = apply("cuda", [im.to("cuda:1") for im in images], packed, 32)
        torch.cuda.synchronize(1)
    assert got.device == torch.device("cuda:1")
    assert_within_tolerance(got, apply("cpp", images, packed, 32), what="cuda:1 vs cpp")


@pytest.mark.cuda
def test_refuses_cuda_graph_capture(gen):
    # A captured graph would replay the crops of the captured parameters forever: refuse, clearly.
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=gen).cuda()
    params = seer_kernels.sample_crop_params((40, 50), 2, (0.1, 1.0), gen)
    seer_kernels.augment_crops(image, params, 16, MEAN, STD)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        with torch.cuda.graph(graph):
            seer_kernels.augment_crops(image, params, 16, MEAN, STD)
