"""JPEG decoding with draft mode, and the op inside DataLoader worker processes."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import seer_kernels
from seer_kernels import CropGroup, CropParams, MultiCropSpec, decode
from tests.ops.multicrop_oracle import assert_within_tolerance, chw, jpeg_bytes, photos


@functools.lru_cache(maxsize=None)
def large_photos() -> dict[str, torch.Tensor]:
    data = pytest.importorskip("skimage.data")
    return {"retina": chw(data.retina()), "hubble": chw(data.hubble_deep_field()),
            "china": photos()["china"], "coffee": photos()["coffee"]}


def test_decode_sizes_and_probe():
    image = photos()["rocket"]  # 427 x 640
    for subsampling, factors in ((2, (8, 4)), (0, (8, 4, 2))):
        data = jpeg_bytes(image, subsampling=subsampling)
        assert decode.probe(data) == ((427, 640), factors)
        full, r = decode.decode_image(data)
        assert r == 1 and full.shape == (3, 427, 640) and full.dtype == torch.uint8
        for reduce in (2, 4, 8):
            small, r = decode.decode_image(data, reduce)
            assert r == reduce and small.shape == (3, math.ceil(427 / r), math.ceil(640 / r))
    import io

    from PIL import Image
    png = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(png, "PNG")
    assert decode.probe(png.getvalue()) == ((427, 640), ())
    assert decode.decode_image(png.getvalue(), 4)[1] == 1  # draft is a JPEG feature
    gray = io.BytesIO()
    Image.fromarray(image[0].numpy()).save(gray, "JPEG")
    g, _ = decode.decode_image(gray.getvalue())
    assert g.shape == (3, 427, 640) and torch.equal(g[0], g[1])


def test_damaged_pixels_and_bad_reduce_are_named():
    """A file cut after its header opens (Pillow reads the header) and fails in the pixel decoding: that was
    Pillow's raw OSError ("image file is truncated"); it is a ValueError naming 'data', as a file that is no
    image at all. reduce takes the integers 1, 2, 4 and 8 only (True and 2.0 passed as 1 and 2)."""
    import io

    from PIL import Image
    image = photos()["rocket"]
    png = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(png, "PNG")
    for data in (jpeg_bytes(image), png.getvalue()):
        cut = data[:len(data) // 2]
        assert decode.probe(cut)[0] == (427, 640)  # the header is whole
        with pytest.raises(ValueError, match="argument 'data' is an image whose pixels Pillow cannot decode "
                                             r"\(OSError: image file is truncated"):
            decode.decode_image(cut)
        with pytest.raises(ValueError, match="argument 'data' is an image whose pixels"):
            seer_kernels.multicrop([cut], MultiCropSpec(), torch.Generator())
    for reduce in (True, 2.0, 3, 0, "2"):
        with pytest.raises(ValueError, match="argument 'reduce' must be 1, 2, 4 or 8"):
            decode.decode_image(png.getvalue(), reduce)
    import numpy as np
    assert decode.decode_image(jpeg_bytes(image), np.int64(2))[1] == 2


def test_high_bit_depth_images_scale_to_8_bits(gen):
    """16-bit greyscale (Pillow modes I;16 from PNG, I;16B and I from TIFF) keeps its high byte; Pillow's own
    convert("RGB") clipped every value above 255 to white. 32-bit float images (mode F) have no agreed range:
    refused, by name, rather than guessed."""
    import io

    import numpy as np
    from PIL import Image
    a = torch.randint(0, 65536, (37, 53), generator=gen, dtype=torch.int64).numpy()
    a[0, :4] = [0, 255, 256, 65535]
    want = torch.from_numpy((a >> 8).astype(np.uint8))
    for im, fmt in ((Image.fromarray(a.astype(np.uint16)), "PNG"),
                    (Image.frombytes("I;16B", (53, 37), a.astype(">u2").tobytes()), "TIFF"),
                    (Image.fromarray(a.astype(np.int32)), "TIFF")):
        data = io.BytesIO()
        im.save(data, fmt)
        got, r = decode.decode_image(data.getvalue())
        assert r == 1 and got.shape == (3, 37, 53) and got.dtype == torch.uint8
        for c in range(3):
            assert torch.equal(got[c], want), f"{im.mode} as {fmt}, channel {c}"
    data = io.BytesIO()
    Image.fromarray(a.astype(np.float32) / 65535).save(data, "TIFF")
    with pytest.raises(ValueError, match="'data' is a 32-bit floating-point image"):
        decode.decode_image(data.getvalue())


def test_draft_rule():
    p = CropParams.identity([[0, 0, 900, 1000], [0, 0, 600, 700]])
    assert decode.draft_factor(p, [32, 32]) == 4  # min shrink 600 / 32 = 18.75 >= 4.5 * 4
    assert decode.draft_factor(p, [32, 64]) == 2  # 700 / 64 ... 600 / 64 = 9.4 >= 9
    assert decode.draft_factor(p, [32, 64], allowed=(8, 4)) == 1
    assert decode.draft_factor(p, [32, 160]) == 1
    jittered = p.replace(jitter=torch.tensor([True, False]),
                         jitter_factors=torch.tensor([[1.5, 1.2, 0.5, 0.1], [1.8, 1.8, 1.8, 0.0]]))
    assert decode.draft_factor(jittered, [32, 32]) == 2  # gain 1.8: 900 / 32 / 1.8 = 15.6 >= 9
    assert torch.allclose(decode.jitter_gain(jittered), torch.tensor([1.8, 1.0], dtype=torch.float64))


def test_draft_decode_within_tolerance(gen):
    """Draft-decoded crops against the full-size decode with the same parameters, on real photos."""
    spec = MultiCropSpec(groups=(CropGroup(2, 32, (0.4, 1.0)), CropGroup(3, 16, (0.1, 0.4))), solarize_p=0.2)
    plain = MultiCropSpec(groups=spec.groups, jitter_p=0.0)  # gain 1: draft applies to every large photo
    used = []
    for name, image in large_photos().items():
        for subsampling in (2, 0):
            data = jpeg_bytes(image, subsampling=subsampling)
            full, _ = decode.decode_image(data)
            for recipe in (spec, plain):
                outs, params = seer_kernels.multicrop([data], recipe, gen, return_params=True)
                sizes = [g.size for g in recipe.groups for _ in range(g.count)]
                used.append(decode.draft_factor(CropParams.cat(params[0]), sizes, decode.probe(data)[1]))
                for g, group in enumerate(recipe.groups):
                    want = seer_kernels.augment_crops(full, params[0][g], group.size, recipe.mean, recipe.std)
                    assert_within_tolerance(outs[g], want, recipe.std, exact=None,
                                            what=f"{name} 4:{'2:0' if subsampling else '4:4'} r={used[-1]}")
    assert max(used) > 1, f"draft mode never applied: {used}"
    # Every reduction, explicitly, with boxes the rule accepts for it (4:4:4, where r = 2 is allowed too).
    data = jpeg_bytes(large_photos()["retina"], subsampling=0)
    full, _ = decode.decode_image(data)
    params = seer_kernels.sample_crop_params(tuple(full.shape[1:]), 6, (0.5, 1.0), gen, solarize_p=0.2)
    gain = float(decode.jitter_gain(params).max())
    for r in (2, 4, 8):
        size = int(float(params.box[:, 2:].min()) / (decode.DRAFT_MARGIN * r * gain))
        assert decode.draft_factor(params, [size] * 6) >= r
        small, got_r = decode.decode_image(data, r)
        assert got_r == r
        got = seer_kernels.augment_crops_batch([small], [params], size, spec.mean, spec.std, reduce=[r])
        want = seer_kernels.augment_crops(full, params, size, spec.mean, spec.std)
        assert_within_tolerance(got, want, spec.std, exact=None, what=f"retina r={r} size={size}")


def test_draft_off_is_exact():
    data = jpeg_bytes(large_photos()["retina"])
    spec = MultiCropSpec(groups=(CropGroup(2, 16, (0.5, 1.0)),), jitter_p=0.0)
    a = seer_kernels.multicrop([data], spec, torch.Generator().manual_seed(0), draft=False)
    b = seer_kernels.multicrop([decode.decode_image(data)[0]], spec, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0])


# ---- DataLoader workers -------------------------------------------------------------------------------

class _Crops(torch.utils.data.Dataset):
    """One image (encoded or decoded) per item, its generator seeded from the item index."""

    def __init__(self, items, spec):
        self.items, self.spec = items, spec

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        outs = seer_kernels.multicrop([self.items[i]], self.spec, torch.Generator().manual_seed(1000 + i))
        return outs, torch.get_num_threads()


def _two_threads(worker_id):
    torch.set_num_threads(2)


@pytest.mark.ext
def test_in_dataloader_workers():
    items = [photos()["coffee"], jpeg_bytes(photos()["rocket"]), photos()["chelsea_portrait"],
             jpeg_bytes(photos()["astronaut"])]
    ds = _Crops(items, MultiCropSpec.swav())
    prev = torch.get_num_threads()
    torch.set_num_threads(2)  # the parent runs the op multi-threaded before the workers fork
    try:
        want = [ds[i][0] for i in range(len(ds))]
    finally:
        torch.set_num_threads(prev)
    # More threads per worker only in spawned workers: GNU OpenMP (torch's thread pool) cannot start threads
    # in a process forked from one that already ran them; that holds for every torch op, not just this one.
    for init, threads, context in ((None, 1, None), (_two_threads, 2, "spawn")):
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, timeout=120, worker_init_fn=init,
                                             multiprocessing_context=context)
        for i, (outs, n_threads) in enumerate(loader):
            assert n_threads == threads  # one thread per worker unless told otherwise
            assert all(torch.equal(a, b) for a, b in zip(outs, want[i]))
