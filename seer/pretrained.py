"""Loading a pretrained backbone in one process: from a training checkpoint or from an exported file.

``seer.load_pretrained(path)`` accepts a run folder (its latest checkpoint), a checkpoints folder, one
``step_*`` checkpoint, or a ``.safetensors`` file written by ``seer export`` (with its ``.json`` next to it).
Checkpoints written under tensor parallelism are merged back into full tensors; under FSDP they are read
as the full tensors DCP stores. Nothing is unpickled (restricted index reader, safetensors).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .config import RunConfig, from_dict
from .model import ViTConfig, VisionTransformer
from .safetensors_stream import Spec
from .train.checkpoint import (CorruptCheckpointError, load_tensors, read_meta, read_saved_config, read_tensor_index,
                               resolve_checkpoint, verify_checkpoint_files)
from .train.state import merge_tensor_parallel, tensor_groups


def checkpoint_config(path: str | Path) -> RunConfig:
    """The resolved run config a checkpoint was written with."""
    return _read_config(resolve_checkpoint(path))


def checkpoint_source(path: str | Path) -> tuple[Path, dict]:
    """(the complete checkpoint ``path`` leads to, what an export records of it: ``{"checkpoint": its
    absolute path, "step": its step}``). An export reads that one checkpoint throughout: the run it comes from
    may write a newer one meanwhile."""
    ckpt = resolve_checkpoint(path).resolve()
    return ckpt, {"checkpoint": str(ckpt), "step": int(read_meta(ckpt, required=("step",))["step"])}


def _read_config(ckpt: Path) -> RunConfig:
    return from_dict(read_saved_config(ckpt))


def checkpoint_backbone_state(path: str | Path, cfg: Optional[RunConfig] = None
                              ) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(run config, full backbone state dict with the single-device names) from a training checkpoint; the
    ViT config is the run config's ``model``. ``cfg``: the checkpoint's config when the caller has read it
    already (:func:`checkpoint_config` of the same checkpoint), so that it is not parsed again."""
    ckpt = resolve_checkpoint(path)
    if cfg is None:
        cfg = _read_config(ckpt)
    with _pruned_is_said(ckpt):
        state = checkpoint_model_state(ckpt, ("backbone",))
    return cfg, {k[len("backbone."):]: v for k, v in state.items()}


def checkpoint_backbone_groups(ckpt: Path) -> tuple[dict[str, Spec], Iterator[dict[str, torch.Tensor]]]:
    """The backbone of the complete checkpoint ``ckpt`` a group of full tensors at a time (the tensors
    outside the blocks, then a block each; single-device names): (name -> (dtype, shape) of every tensor,
    known from the index before any is read; the groups, read as they are taken). For a writer that places
    each group before it takes the next (:func:`seer.safetensors_stream.write_safetensors`). The files are
    checked against their checksums here, before the caller writes anything: a damaged checkpoint fails
    before any output is touched, as when the tensors were read whole first."""
    with _pruned_is_said(ckpt):
        layout, index, stored = _stored_tensors(ckpt, ("backbone",))
        verify_checkpoint_files(ckpt)
    # The merged shapes from the index alone: the slices merged as meta tensors (no memory, nothing read).
    meta = _merge({k: torch.empty(m.size, dtype=m.properties.dtype, device="meta") for k, m in stored.items()},
                  layout)
    specs = {k[len("backbone."):]: (t.dtype, tuple(t.shape)) for k, t in meta.items()}

    def groups() -> Iterator[dict[str, torch.Tensor]]:
        with _pruned_is_said(ckpt):
            for group in _read_groups(ckpt, layout, index, stored, verified=True):
                yield {k[len("backbone."):]: v for k, v in group.items()}
                group = None  # noqa: F841  (let go before the next group is read)
    return specs, groups()


@contextlib.contextmanager
def _pruned_is_said(ckpt: Path) -> Iterator[None]:
    """Reading checkpoint ``ckpt`` of a run: a checkpoint gone while its files were read is not a damaged one
    (whose remedy, moving it away to resume from the one before, makes no sense here): its run, still
    training, pruned it after saving newer ones (an export or seer eval of a run folder reads the checkpoint
    that was latest when it began). That is a FileNotFoundError saying so."""
    try:
        yield
    except CorruptCheckpointError:
        if not ckpt.exists():
            raise FileNotFoundError(f"checkpoint {ckpt} was removed while it was read (its run pruned it: is it "
                                    f"still training?); run again to read the run's latest checkpoint then, or "
                                    f"give a checkpoint that it keeps (a copy)") from None
        raise


def checkpoint_model_state(ckpt: Path, parts: tuple[str, ...] = ("backbone", "head"), *,
                           collective: bool = False) -> dict[str, torch.Tensor]:
    """Full tensors (CPU) of the SwAV model's ``parts`` (its submodules 'backbone', 'head') from the complete
    checkpoint ``ckpt``, named as in the single-device model ('backbone.blocks.0.attn.qkv.weight'):
    tensor-parallel slices merged, FSDP shards read whole. ``collective``: every process of the default group
    calls it and they split the checksum verification (each still holds every tensor). Read a group at a
    time: the tensor-parallel slices of one group are held beside the full tensors while it is merged, not
    the whole model's (2x the weights at the peak, for a checkpoint written under tensor parallelism)."""
    state: dict[str, torch.Tensor] = {}
    for group in iter_checkpoint_model_state(ckpt, parts, collective=collective):
        state.update(group)
    return state


def iter_checkpoint_model_state(ckpt: Path, parts: tuple[str, ...] = ("backbone", "head"), *,
                                collective: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`checkpoint_model_state`'s tensors a group at a time (:func:`seer.train.state.tensor_groups`: the
    tensors outside the transformer blocks, then a block each), so that a caller that places each group
    before taking the next holds one group's tensors (and, while a group is merged, its tensor-parallel
    slices), not the model's. The files are checked against their checksums once, before the first group is
    read; each group is one dcp.load, the index read once for all. ``collective``: every process of the
    default group iterates to the end, and all meet the same groups in the same order (they come from the one
    index every process reads)."""
    yield from _read_groups(ckpt, *_stored_tensors(ckpt, parts), collective=collective)


def _read_groups(ckpt: Path, layout: dict[str, dict], index, stored: dict, *, collective: bool = False,
                 verified: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`iter_checkpoint_model_state`'s groups from what :func:`_stored_tensors` read; ``verified``: the
    files were checked against their checksums already."""
    for i, keys in enumerate(tensor_groups(stored)):
        # The first call verifies the files (collectively: the ranks split them), the later ones do not.
        yield _read_group(ckpt, {k: stored[k] for k in keys}, layout, single_process=not collective,
                          index=index, verify=i == 0 and not verified)


def _stored_tensors(ckpt: Path, parts: tuple[str, ...]) -> tuple[dict[str, dict], object, dict]:
    """(the checkpoint's tensor-parallel layout, its DCP index, {key: index entry} of the tensors of the
    SwAV model's ``parts``); ValueError where a backbone is asked for and it holds none."""
    layout = read_meta(ckpt).get("tp_layout", {})
    index = read_tensor_index(ckpt)
    prefixes = tuple(f"model/{part}." for part in parts)
    stored = {k: m for k, m in index.state_dict_metadata.items()
              if k.startswith(prefixes) and isinstance(m, TensorStorageMetadata)}
    if not any(k.startswith("model/backbone.") for k in stored) and "backbone" in parts:
        raise ValueError(f"{ckpt} holds no backbone tensors")
    return layout, index, stored


def _read_group(ckpt: Path, stored: dict, layout: dict[str, dict], **load) -> dict[str, torch.Tensor]:
    """The full tensors of the checkpoint keys ``stored`` (key -> its index entry), slices merged."""
    dest = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in stored.items()}
    load_tensors(ckpt, dest, **load)  # a damaged file: CorruptCheckpointError naming it
    return _merge(dest, layout)


def _merge(dest: dict[str, torch.Tensor], layout: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> model names, each tensor-parallel parameter's slices in ``dest`` merged."""
    names = {k[len("model/"):].split("@tp")[0] for k in dest}
    return merge_tensor_parallel(dest, {k: v for k, v in layout.items() if k in names}, prefix="model/")


def load_pretrained(path: str | Path, *, device: str | torch.device = "cpu") -> VisionTransformer:
    """The pretrained backbone as a module in eval mode: images (N, 3, H, W) -> class-token features (N, D).

    H and W must be multiples of the patch size; other sizes than the training crop use the interpolated
    position embedding. Inputs are expected normalised as in training (``data.crops.mean/std`` of the run
    config, saved next to the checkpoint and in the export's JSON).
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        cfg, state = checkpoint_backbone_state(p)
        return backbone_module(cfg.model, state, device=device)
    from .export import read_export
    vit, state = read_export(p)
    return backbone_module(vit, state, device=device, source=p)


def backbone_module(vit: ViTConfig, state: dict[str, torch.Tensor], *,
                    device: str | torch.device = "cpu", source: Optional[Path] = None) -> VisionTransformer:
    """The backbone built from its config and (full, single-device) state dict, in eval mode. ``source``: the
    exported file the two came from, named in the ValueError when they do not fit each other."""
    with torch.device("meta"):
        model = VisionTransformer(vit, device="meta")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        if source is None:
            raise
        raise ValueError(f"{source}: its tensors do not fit the ViT that {source.with_suffix('.json').name} "
                         f"describes (the two files come from different exports?): "
                         f"{' '.join(str(e).split())[:300]}") from None
    return model.to(device).eval()


def export_info(path: str | Path) -> dict:
    """The JSON written next to an exported .safetensors file (:func:`seer.export.export_info`)."""
    from .export import export_info as info
    return info(path)
