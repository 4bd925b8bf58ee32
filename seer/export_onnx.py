"""Export the pretrained backbone to ONNX, checked against the torch model in onnxruntime before it is kept.

``seer export --checkpoint DIR --format onnx --out vit.onnx`` writes

* ``vit.onnx``: the backbone in float32, opset :data:`OPSET`, input ``images`` (N, 3, S, S) float32 (normalised
  as in training), output ``features`` (N, D) float32, the class token after the final norm (what
  ``seer.load_pretrained`` returns); the batch N is dynamic, S is the run's evaluation size
  (``eval.image_size`` or ``data.crops.global_size``). With ``dynamic_size`` (``--onnx-dynamic-size``) the
  input is (N, 3, H, W) for any H and W that are multiples of the patch size p: the graph resamples the
  position embedding to the (H/p, W/p) patch grid as the torch model does (ONNX ``Resize``, cubic,
  antialiased: opset 18). ONNX has no way to refuse another size: the graph would run and drop the last
  H mod p rows (W mod p columns), the patch convolution's floor, so the JSON states ``multiple_of``: p.
* ``vit.json``: the normalisation, the image size, the input and output, the opset and the versions that made
  the file, the verification's measured difference, seer's ViT config and the run's whole config, and
  ``external_data``: the data file's name, or null.
* ``vit.onnx.data``, where the float32 weights pass :data:`MAX_WEIGHT_BYTES` (protobuf refuses a message of
  2 GiB, and the .onnx file is one message: ``huge``, ``giant``, ``vit-10b``) or where asked
  (``external_data=True``, ``--onnx-external-data``): the weights as ONNX external data, the tensors' raw bytes
  one after another, which ``vit.onnx`` names by this relative file name (each initializer's ``location``,
  ``offset`` and ``length``). The two files go together: onnxruntime reads the data from the .onnx's folder.

Verification: the exported file runs in onnxruntime (CPU) on random images at batch 1 and 3 (the graph is
traced at batch 2, so both exercise the dynamic batch), with ``dynamic_size`` also on one image of each of
:func:`verify_sizes` (smaller, larger, not square: a size fixed in the graph cannot pass), and is kept only
where

    max |f_onnx - f_torch|  <=  RTOL * max |f_torch|

over all of them; otherwise :class:`ExportMismatchError` and no new file. The files are written and
verified in the scratch folder ``vit.onnx.part/`` under their final names (so the ``location`` that the .onnx
records is ``vit.onnx.data``, not a .part name), then renamed into place in the order
:func:`seer.export.write_export` gives, which never pairs a .onnx with another export's data.

Attention is traced through torch's SDPA (``seer_kernels.use_backend("sdpa")``): the exporter writes it as
MatMul/Softmax, while the kernels' custom op ``seer::attention_fwd`` (the triton and reference backends) has no
ONNX translation.

Running it::

    import json, numpy as np, onnxruntime as ort
    info = json.load(open("vit.json"))
    session = ort.InferenceSession("vit.onnx")
    # images: (N, 3, S, S) float32 in [0, 1], S = info["image_size"], made as info["preprocessing"] says
    # (the shorter side resized to S * 8/7, then the centre S x S: what seer eval and seer features feed it)
    x = (images - np.array(info["mean"], "f4")[:, None, None]) / np.array(info["std"], "f4")[:, None, None]
    features = session.run(["features"], {"images": x})[0]   # (N, D)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .config import RunConfig, to_dict
from .deps import require
from .eval.datasets import preprocessing_text
from .export import SEER_MARK, check_out, side_files, write_export
from .model import ViTConfig, VisionTransformer

# The lowest opset that torch.onnx's exporter implements without a version conversion (its torchlib opset; its
# default is 20): the oldest runtimes can run the file. LayerNormalization (17) stays one op; GELU is written with
# Erf (Gelu is opset 20) and attention as MatMul/Softmax (Attention is opset 23).
OPSET = 18
# Of the feature scale. Measured: 4e-7 of it (tiny) and 1.2e-6 (ViT-S/16, 224 px), float32 sums in another order.
RTOL = 1e-4
TRACE_BATCH = 2  # traced here; verified at other sizes, so that a batch fixed in the graph cannot pass
VERIFY_BATCHES = (1, 3)
# protobuf refuses messages of 2 GiB; the weights are most of the file (the graph of ViT-H/14 is 1.6 MiB).
# Above it the weights go to external data.
MAX_WEIGHT_BYTES = 2**31 - 2**26
FEATURE = "seer export --format onnx"


class ExportMismatchError(RuntimeError):
    """onnxruntime's features of the exported file differ from the torch model's beyond the tolerance."""


class OnnxExport(NamedTuple):
    onnx: Path
    json: Path
    max_abs_diff: float  # max |f_onnx - f_torch| over the verification batches
    tolerance: float  # RTOL * max |f_torch|
    external_data: Optional[Path] = None  # OUT.onnx.data, where the weights are there


def export_onnx(checkpoint: str | Path, out: str | Path, external_data: Optional[bool] = None, *,
                dynamic_size: bool = False) -> OnnxExport:
    """Write OUT.onnx and OUT.json (and OUT.onnx.data: ``external_data``, as in :func:`export_onnx_model`; module
    doc) from a training checkpoint, verified in onnxruntime; ``dynamic_size``: any image height and width
    that are multiples of the patch size (module doc)."""
    from .pretrained import backbone_module, checkpoint_backbone_state, checkpoint_config, checkpoint_source

    out = Path(out)
    check_out(out, "onnx")  # before the checkpoint is read, not after
    _check_external_data(external_data)
    _check_dynamic_size(dynamic_size)
    _require_packages()
    checkpoint, source = checkpoint_source(checkpoint)
    cfg = checkpoint_config(checkpoint)
    uses_external_data(cfg.model, external_data)  # from the config alone, before the tensors are read
    model = backbone_module(cfg.model, checkpoint_backbone_state(checkpoint, cfg)[1]).float()
    return export_onnx_model(model, out, cfg, external_data, dynamic_size=dynamic_size, source=source)


def export_onnx_model(model: VisionTransformer, out: str | Path, cfg: RunConfig,
                      external_data: Optional[bool] = None, *, dynamic_size: bool = False,
                      source: Optional[dict] = None) -> OnnxExport:
    """Write OUT.onnx and OUT.json for ``model``, a seer ViT in eval mode, float32, on the CPU (a freshly built
    one, for instance: ``VisionTransformer(cfg.model).eval()``), whose architecture is ``cfg.model``; ``cfg``
    gives the image size, the normalisation and the run config that the JSON records. ``external_data``: the
    weights in OUT.onnx.data (True), in OUT.onnx (False: ValueError where they pass protobuf's limit), or in
    OUT.onnx.data where they pass it (None, the default). ``dynamic_size``: the input's height and width are
    dynamic too (any multiples of the patch size), not the run's evaluation size alone. ``source``: what the
    JSON records of where the weights come from (:func:`seer.pretrained.checkpoint_source`; None: a model
    given as such)."""
    out = Path(out)
    check_out(out, "onnx")
    _check_model(model, cfg)
    _check_dynamic_size(dynamic_size)
    external = uses_external_data(cfg.model, external_data)
    onnx, onnxscript, ort = _require_packages()
    size = cfg.eval.image_size or cfg.data.crops.global_size
    (data_file,) = side_files(out, "onnx")  # OUT.onnx.data, as torch.onnx names it
    data = data_file.name if external else None
    measured = {}

    def write(path: Path) -> str:
        program = _to_onnx(model, size, dynamic_size)
        if data is not None:  # (check_out reads it, without the JSON: this .onnx's data file is seer's)
            program.model.metadata_props["external_data"] = data
        # onnx_ir's save, not program.save: that one names the data after the file it writes, and moves the
        # weights there by itself above 1.5 GB.
        onnxscript.ir.save(program.model, path, external_data=data)
        del program  # (the exporter's graph and its constants, before onnxruntime loads its own copy)
        diff, tol = verify(path, model, size, dynamic_size)
        measured.update(diff=diff, tol=tol)
        vit = model.cfg
        hw = ["height", "width"] if dynamic_size else [size, size]
        # (multiple_of: the graph cannot refuse another size; it would drop the last H mod p rows, the
        # convolution's floor, where the torch model raises)
        sizes = {"multiple_of": vit.patch_size} if dynamic_size else {}
        info = {"format": "onnx", "producer": "seer", "file": out.name,
                "input": {"name": "images", "dtype": "float32", "shape": ["batch", vit.in_chans, *hw], **sizes},
                "output": {"name": "features", "dtype": "float32", "shape": ["batch", vit.embed_dim]},
                "mean": list(cfg.data.crops.mean), "std": list(cfg.data.crops.std), "image_size": size,
                "dynamic_size": dynamic_size, "patch_size": vit.patch_size,
                "features": "class token (N, D)",
                "preprocessing": preprocessing_text(size),
                "opset": OPSET, "onnx_version": onnx.__version__, "onnxscript_version": onnxscript.__version__,
                "onnxruntime_version": ort.__version__, "torch_version": torch.__version__,
                "verification": {"runtime": "onnxruntime CPUExecutionProvider", "batch_sizes": list(VERIFY_BATCHES),
                                 "image_sizes": [[size, size]] + [list(hw) for hw in verify_sizes(
                                     size, vit.patch_size, dynamic_size)],
                                 "max_abs_diff": diff, "tolerance": tol, "rtol_of_feature_scale": RTOL},
                "external_data": data, "source": source, "seer_vit_config": dataclasses.asdict(vit),
                "seer_run_config": to_dict(cfg)}
        return json.dumps(info, indent=1)

    onnx_path, json_path = write_export(out, write, side=[data_file.name])
    return OnnxExport(onnx_path, json_path, measured["diff"], measured["tol"], data_file if external else None)


def _to_onnx(model: VisionTransformer, size: int, dynamic_size: bool = False):
    """torch.onnx's program for ``model`` on (N, C, size, size) float32 images, N dynamic (and, with
    ``dynamic_size``, H and W: multiples of the patch size)."""
    import seer_kernels
    x = torch.randn(TRACE_BATCH, model.cfg.in_chans, size, size)
    # torch.export keeps the batch a symbol only where nothing on the way turns it into a Python int.
    # seer_kernels.attention's dispatcher did (int() of the sizes): the batch was pinned to 2, torch.onnx wrote a
    # graph for 2 images, and onnxruntime refused 1 ("Expected: 2"). verify() runs other batch sizes, so that
    # such a graph is never kept.
    batch = torch.export.Dim("batch")
    dims = {0: batch}
    if dynamic_size:  # (H = p * h: the patch embedding's divisibility holds for every size of the graph)
        p = model.patch_size
        dims.update({2: p * torch.export.Dim("height_patches", min=1), 3: p * torch.export.Dim("width_patches", min=1)})
    with seer_kernels.use_backend("sdpa", op="attention"), torch.no_grad(), _quiet("onnxscript", "onnx_ir"):
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["images"], output_names=["features"],
                                    opset_version=OPSET, dynamic_shapes=(dims,), verbose=False)
    key, value = SEER_MARK  # (an export killed before its JSON was renamed is recognised, and replaced, by this)
    program.model.metadata_props[key] = value
    return program


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Only warnings from these loggers inside the block: the CLI logs at INFO, and the exporter's optimiser
    passes log some 40 lines per export there (each initializer it deduplicates, each pass that removes
    nothing)."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def verify_sizes(size: int, patch: int, dynamic_size: bool) -> list[tuple[int, int]]:
    """The (H, W) images the verification runs at batch 1 besides ``size`` x ``size``: with ``dynamic_size``
    one smaller, one larger and not square (multiples of ``patch``)."""
    if not dynamic_size:
        return []
    small = max(patch, size - 2 * patch)
    return [(small, small), (size + patch, size + 3 * patch)]


def verify(path: str | Path, model: VisionTransformer, size: int, dynamic_size: bool = False) -> tuple[float, float]:
    """(max |f_onnx - f_torch|, tolerance) of the ONNX file ``path`` against ``model`` on random images at
    each of :data:`VERIFY_BATCHES` (and, with ``dynamic_size``, one image of each of :func:`verify_sizes`);
    ExportMismatchError where the difference exceeds the tolerance (or is not finite) or onnxruntime's output
    has another shape."""
    import numpy as np
    ort = require("onnxruntime", FEATURE, "onnxruntime", extra="onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many as torch uses (train.threads, OMP_...)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    diffs, scale = [], 0.0
    runs = [(n, size, size) for n in VERIFY_BATCHES] + \
        [(1, h, w) for h, w in verify_sizes(size, model.patch_size, dynamic_size)]
    for n, h, w in runs:
        x = torch.randn(n, model.cfg.in_chans, h, w, generator=gen)
        with torch.no_grad():
            want = model(x).numpy()
        try:
            got = session.run(["features"], {"images": x.numpy()})[0]
        except Exception as e:  # onnxruntime's errors derive from Exception alone (InvalidArgument, Fail, ...)
            # e.g. a batch fixed in the graph: "Got invalid dimensions for input: images ... Expected: 2"
            raise ExportMismatchError(f"onnxruntime cannot run the exported ONNX model on {n} images of {h} x {w} "
                                      f"(traced on {TRACE_BATCH} of {size} x {size}): "
                                      f"{' '.join(str(e).split())[:300]}; nothing was written") from None
        if got.shape != want.shape:
            raise ExportMismatchError(f"the exported ONNX model gives features of shape {got.shape} for {n} "
                                      f"images of {h} x {w}, the torch model {want.shape}; nothing was written")
        if not np.isfinite(want).all():
            raise ExportMismatchError("the torch model's features of random images are not finite (a diverged "
                                      "checkpoint?): nothing to compare the export with; nothing was written")
        diffs.append(np.abs(got.astype(np.float64) - want).max())
        scale = max(scale, float(np.abs(want).max()))
    diff, tol = float(np.max(diffs)), RTOL * scale  # (np.max keeps a NaN, Python's max may drop it)
    if not diff <= tol:
        tried = ", ".join(f"{n} x {h} x {w}" for n, h, w in runs)
        raise ExportMismatchError(f"the exported ONNX model disagrees with the torch model: max |onnxruntime - "
                                  f"torch| = {diff:.3g} on random images ({tried}), tolerance {tol:.3g} "
                                  f"({RTOL:g} x the largest feature, {scale:.3g}); nothing was written")
    return diff, tol


def _require_packages():
    """(onnx, onnxscript, onnxruntime) modules; MissingDependencyError naming the first one missing."""
    return tuple(require(name, FEATURE, name, extra="onnx") for name in ("onnx", "onnxscript", "onnxruntime"))


def _check_model(model, cfg: RunConfig) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"export_onnx_model: argument 'model' must be a seer VisionTransformer, got "
                        f"{type(model).__name__}")
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"export_onnx_model: argument 'cfg' must be a seer RunConfig, got {type(cfg).__name__}")
    if model.cfg != cfg.model:
        raise ValueError("export_onnx_model: argument 'cfg' describes another architecture (cfg.model) than "
                         "'model' (model.cfg); the JSON would record the wrong one")
    tensors = list(model.parameters()) + list(model.buffers())
    if model.training or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("export_onnx_model: argument 'model' must be in eval mode, float32, on the CPU "
                         "(model.float().cpu().eval())")


def _check_dynamic_size(dynamic_size) -> None:
    if not isinstance(dynamic_size, bool):
        raise TypeError(f"argument 'dynamic_size' must be True or False, got {dynamic_size!r}")


def _check_external_data(external_data) -> None:
    if external_data is not None and not isinstance(external_data, bool):
        raise TypeError(f"argument 'external_data' must be True, False or None (automatic), got {external_data!r}")


def uses_external_data(vit: ViTConfig, external_data: Optional[bool] = None) -> bool:
    """Whether the export of a ``vit`` backbone writes its weights to external data: ``external_data`` where
    given, else whether its float32 weights pass :data:`MAX_WEIGHT_BYTES`; ValueError for False where they
    do (protobuf's 2 GiB limit on one .onnx file)."""
    _check_external_data(external_data)
    with torch.device("meta"):
        params = sum(p.numel() for p in VisionTransformer(vit, device="meta").parameters())
    large = 4 * params > MAX_WEIGHT_BYTES
    if external_data is False and large:
        raise ValueError(f"the backbone has {params / 1e6:.0f}M parameters, {4 * params / 2**30:.1f} GiB in float32: "
                         f"one .onnx file holds at most 2 GiB (protobuf), so external_data=False cannot be written; "
                         f"leave it None (automatic) or True, to write the weights to OUT.onnx.data")
    return large if external_data is None else external_data
