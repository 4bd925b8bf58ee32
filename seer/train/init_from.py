"""Continued pretraining (``checkpoint.init_from``): a new run whose weights start as another run's.

The source is a run folder or checkpoint (its latest checkpoint; backbone, projection head and prototypes) or
a ``seer export --format timm`` .safetensors file (the backbone only). Only the weights of
``checkpoint.init_parts`` are taken from it; the optimizer state, the schedules, the data position, the queue
and the RNG streams are the new run's own, from step 0 (the resume of ``checkpoint.resume`` takes them all).

Loading: when the source is a checkpoint written with the run's ``parallel.tp``, DCP reads each process's
own shards straight into the model, resharding over another number of data-parallel processes as a resume
does (no process holds more than its shards); otherwise (an export, another tensor-parallel split) every
process reads the full tensors and keeps its slice and shard (:func:`seer.parallel.state.load_full_state_dict`),
a group at a time (:func:`seer.train.state.tensor_groups`: a transformer block, or the tensors outside the
blocks), so that it holds one group's full tensors, not the model's.

Another resolution (DINOv2's high-resolution phase: pretrain at 224, continue at 448): the source's
``model.img_size`` may differ from the run's when the patch size does not. Only the learned position embedding
(1, 1 + G*G, d), G = img_size // patch_size, then has another shape; the run's is the source's resampled from
G_src x G_src to G x G patches by :func:`seer.model.layers.interpolate_pos_embed` (the class-token entry kept,
the patch entries bicubic, antialiased when shrinking), computed in float32 and cast to the parameter's dtype:
the embedding the source itself adds at forward time to crops of the run's ``model.img_size``. Every other
tensor is the source's, unchanged. Another ``model.patch_size`` changes the patch embedding and is refused.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from .. import config as C
from ..model.layers import interpolate_pos_embed
from ..parallel import ParallelDims
from . import state as S
from .checkpoint import (CorruptCheckpointError, agreed_checkpoint, architecture_diffs, list_checkpoints, load_tensors,
                         read_meta, read_saved_config, read_tensor_index)

# Model keys that shape no tensor (regularisation, the initialisation's spread, the norms' epsilon): the
# source's may differ from the run's.
NOT_SHAPING = ("model.drop_path_rate", "model.dropout", "model.init_std", "model.norm_eps")
# The one shaping key that may differ: it shapes the position embedding only, which is resampled (PosResize).
RESIZABLE = "model.img_size"
POS_EMBED = "backbone.pos_embed"


@dataclass(frozen=True)
class PosResize:
    """The source's ``model.img_size`` (``was``) and the run's (``now``), both multiples of the patch side
    ``patch``: the position embedding goes from a was/patch to a now/patch grid of patches per side."""
    was: int
    now: int
    patch: int

    @property
    def grids(self) -> tuple[int, int]:
        return self.was // self.patch, self.now // self.patch

    def apply(self, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The source's full position embedding ``pos`` (1, 1 + G_src^2, d) on the run's grid, as ``dtype``;
        ValueError where its shape is not that of the source's grid."""
        g, new = self.grids
        if pos.dim() != 3 or tuple(pos.shape[:2]) != (1, 1 + g * g):
            raise ValueError(f"{POS_EMBED}: the tensor has shape {tuple(pos.shape)}, not (1, {1 + g * g}, d) of "
                             f"the source's model.img_size {self.was} (patch {self.patch})")
        return interpolate_pos_embed(pos.float(), (new, new), g).to(dtype)

    def record(self) -> dict:
        return {"img_size": [self.was, self.now], "grid": list(self.grids)}

    def describe(self) -> str:
        (g, new), (a, b) = self.grids, (self.was, self.now)
        return (f"checkpoint.init_from: position embedding resized from {g}x{g} to {new}x{new} patches "
                f"(model.img_size {a} -> {b})")


@dataclass
class InitSource:
    """A resolved ``checkpoint.init_from``.

    Attributes:
        given: the path as configured, made absolute (``~`` expanded, symbolic links kept).
        file: the checkpoint folder, or the exported .safetensors file, that is read.
        step: the source run's step (None for an export, which does not record it).
        saved: the source's run config as a mapping of sections (an export: its ``model`` section only).
        tp: the source's ``parallel.tp`` (1 for an export, whose tensors are full).
        normalisation: the ``data.crops`` mean and std the source's images were normalised with ({} where
            it does not record them).
        exported_from: an export's ``source`` (the checkpoint it was made from and its step; None for a
            checkpoint, or an export written before exports recorded it).
    """
    given: str
    file: Path
    step: Optional[int]
    saved: dict
    tp: int = 1
    normalisation: Optional[dict] = None
    exported_from: Optional[dict] = None

    @property
    def is_export(self) -> bool:
        return self.step is None

    def record(self, parts: str, resize: Optional[PosResize] = None) -> dict:
        """What the new run's checkpoints keep of where its weights came from (meta.json's ``init_from``;
        ``pos_embed_resized`` where the position embedding was resampled)."""
        out = {"path": self.given, "resolved": str(Path(self.given).resolve()), "file": str(self.file.resolve()),
               "step": self.step, "parts": parts}
        if self.exported_from is not None:
            out["exported_from"] = self.exported_from
        if resize is not None:
            out["pos_embed_resized"] = resize.record()
        return out

    def describe(self, parts: str) -> str:
        src = self.exported_from
        at = f"step {self.step} of that run" if self.step is not None else \
            f"an export of step {src['step']} of {src['checkpoint']}" if src is not None else \
            "an export: no step recorded"
        return f"{self.given} ({at}, {parts})"


def init_path(value: str) -> str:
    """``checkpoint.init_from=value`` as the run records it: ``~`` expanded, made absolute (links kept)."""
    return os.path.abspath(os.path.expanduser(value))


def resolve_init_source(value: str) -> InitSource:
    """The source ``checkpoint.init_from=value`` names; FileNotFoundError or ValueError naming the key."""
    given = init_path(value)
    p = Path(given)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint.init_from: {value!r} does not exist (expected a run folder, a "
                                f"checkpoint folder or a .safetensors file of seer export --format timm)")
    if p.suffix == ".safetensors":
        from ..export import export_info, export_source
        try:
            info = export_info(p)
        except (OSError, ValueError) as e:
            raise type(e)(f"checkpoint.init_from: {e}") from None
        vit = info["seer_vit_config"]
        if not isinstance(vit, dict):
            raise ValueError(f"checkpoint.init_from: {p.with_suffix('.json')}: 'seer_vit_config' is not a mapping")
        # (the export's JSON names the checkpoint and step it was made from: kept in the run's provenance)
        return InitSource(given, p, None, {"model": vit},
                          normalisation={"mean": info.get("mean"), "std": info.get("std")},
                          exported_from=export_source(info))
    if p.is_file():
        raise ValueError(f"checkpoint.init_from: {value!r} is a file but not a .safetensors export; expected a "
                         f"run folder, a checkpoint folder or a .safetensors file of seer export --format timm")
    try:
        ckpt = agreed_checkpoint(p)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint.init_from: {e}") from None
    except CorruptCheckpointError as e:  # (its newest step_* folder lacks files)
        raise CorruptCheckpointError(f"checkpoint.init_from={given}: {e}") from None
    with source_errors(given, ckpt):
        meta = read_meta(ckpt, required=("step", "tp"))
        saved = read_saved_config(ckpt)
    crops = (saved.get("data") or {}).get("crops") or {}
    return InitSource(given, ckpt, int(meta["step"]), saved, int(meta["tp"]),
                      normalisation={"mean": crops.get("mean"), "std": crops.get("std")})


# The remedy that checkpoint.py's errors give for a damaged checkpoint of the run's own (move it away to resume
# from the one before): of a source, the one before is given to checkpoint.init_from instead.
_OWN_REMEDY = re.compile(r"[;,]? (else )?move this checkpoint away to resume from the one before it$")


@contextlib.contextmanager
def source_errors(given: str, ckpt: Path) -> Iterator[None]:
    """Reading the source checkpoint ``ckpt`` (of ``checkpoint.init_from``, made absolute: ``given``): its
    CorruptCheckpointError names the key, with a remedy for a source (an earlier checkpoint of it); a
    checkpoint that was removed while it was read (the source run, still training, pruned it) is a
    FileNotFoundError that says so, not a damaged checkpoint."""
    try:
        yield
    except CorruptCheckpointError as e:
        if not ckpt.exists():
            raise FileNotFoundError(
                f"checkpoint.init_from={given}: its checkpoint {ckpt} was removed while it was read (the source "
                f"run pruned it: is it still training?); run again to take the source's latest checkpoint then, "
                f"or give a checkpoint that it keeps (a copy)") from None
        done = list_checkpoints(ckpt.parent)  # (oldest first)
        names = [q.name for q in done]
        earlier = done[:names.index(ckpt.name)] if ckpt.name in names else done
        remedy = f"give an earlier checkpoint of it, checkpoint.init_from={earlier[-1]}" if earlier else \
            "restore it from a copy, or give another source"
        raise CorruptCheckpointError(f"checkpoint.init_from={given}: {_OWN_REMEDY.sub('', str(e))}; the source "
                                     f"is damaged: {remedy}") from None


def part_names(parts: str) -> tuple[str, ...]:
    """The SwAV model's submodules that ``checkpoint.init_parts`` initialises from the source."""
    return ("backbone", "head") if parts == "all" else ("backbone",)


def pos_resize(src: InitSource, cfg: C.RunConfig) -> Optional[PosResize]:
    """The resampling of the position embedding where the source's ``model.img_size`` is another multiple of
    the run's ``model.patch_size`` (the patch sizes equal); None where the sizes are equal or it cannot be."""
    saved, m = src.saved.get("model") or {}, cfg.model
    was = saved.get("img_size")
    if was == m.img_size or saved.get("patch_size") != m.patch_size or isinstance(was, bool) \
            or not isinstance(was, int) or was < m.patch_size or was % m.patch_size:
        return None
    return PosResize(was, m.img_size, m.patch_size)


def check_init_architecture(src: InitSource, cfg: C.RunConfig) -> None:
    """ConfigError with the differing keys where the source's tensors cannot be this run's: every key of
    ``model`` (and of ``head`` for init_parts=all) that shapes a tensor must be the same, but for
    ``model.img_size`` alone (:func:`pos_resize`)."""
    parts = cfg.checkpoint.init_parts
    if src.is_export and parts == "all":  # (validate refuses it from the suffix; a renamed file lands here)
        raise C.ConfigError(f"checkpoint.init_from={src.given}: an export holds the backbone only; use "
                            f"checkpoint.init_parts=backbone")
    sections = ("model", "head") if parts == "all" else ("model",)
    missing = [sec for sec in sections if sec not in src.saved]
    if missing:
        raise C.ConfigError(f"checkpoint.init_from={src.given}: its run config has no {', '.join(missing)} "
                            f"section, so its architecture cannot be checked")
    diffs = architecture_diffs(src.saved, C.to_dict(cfg), sections, ignore=NOT_SHAPING, source="source")
    if pos_resize(src, cfg) is not None:  # (allowed: the position embedding is resampled)
        diffs = [d for d in diffs if not d.startswith(RESIZABLE + ":")]
    if diffs:
        hint = "" if parts == "backbone" or "model" in {d.split(".")[0] for d in diffs} else \
            " (checkpoint.init_parts=backbone starts the head afresh)"
        keys = {d.split(":")[0] for d in diffs}
        if {RESIZABLE, "model.patch_size"} <= keys:
            hint += (" (another model.img_size alone is allowed, its position embedding resized; another "
                     "model.patch_size is not: it shapes the patch embedding)")
        raise C.ConfigError(f"checkpoint.init_from={src.given} has another architecture than the config{hint}: "
                            + "; ".join(diffs))


def not_shaping_changes(src: InitSource, cfg: C.RunConfig) -> list[str]:
    """The keys that may differ from the source and do ('model.dropout: source 0.0, config 0.1')."""
    return not_shaping_diffs(src.saved, C.to_dict(cfg), source="source")


def not_shaping_diffs(saved: dict, now: dict, *, source: str = "checkpoint") -> list[str]:
    """The NOT_SHAPING keys whose value in the saved run config ``saved`` differs from ``now``
    (:func:`~seer.train.checkpoint.architecture_diffs`' lines, ``source`` naming the saved side)."""
    return [d for d in architecture_diffs(saved, now, ("model",), source=source) if d.split(":")[0] in NOT_SHAPING]


def normalisation_changes(src: InitSource, cfg: C.RunConfig) -> list[str]:
    """'data.crops.mean: source X, config Y' (and std) where the run normalises its images otherwise than
    the source's backbone was trained (not where the source does not record it)."""
    now = {"mean": list(cfg.data.crops.mean), "std": list(cfg.data.crops.std)}
    out = []
    for key in ("mean", "std"):
        was = (src.normalisation or {}).get(key)
        if isinstance(was, (list, tuple)) and [float(v) for v in was] != [float(v) for v in now[key]]:
            out.append(f"data.crops.{key}: source {list(was)!r}, config {now[key]!r}")
    return out


def load_init_weights(src: InitSource, model: torch.nn.Module, dims: ParallelDims, parts: str,
                      resize: Optional[PosResize] = None) -> None:
    """Copy the source's tensors of ``parts`` into the (parallelised) model, in place (collective: every
    process calls it); ``resize`` (:func:`pos_resize`): the position embedding resampled to the run's grid.
    The architecture was checked (:func:`check_init_architecture`)."""
    with source_errors(src.given, src.file):
        _load_init_weights(src, model, dims, parts, resize)


def _load_init_weights(src: InitSource, model: torch.nn.Module, dims: ParallelDims, parts: str,
                       resize: Optional[PosResize]) -> None:
    names = part_names(parts)
    dtype = dict(model.named_parameters())[POS_EMBED].dtype if resize is not None else None
    if not src.is_export and src.tp == dims.tp:
        _load_own_shards(src, model, dims, names, resize, dtype)
    else:
        _load_full_tensors(src, model, dims, names, resize, dtype)


def _load_own_shards(src: InitSource, model: torch.nn.Module, dims: ParallelDims, names: tuple[str, ...],
                     resize: Optional[PosResize], dtype: Optional[torch.dtype]) -> None:
    """The model's own shards, read (and resharded over the data-parallel processes) by DCP, as a resume
    reads them; the optimizer's and the per-rank state are not read."""
    from ..parallel.state import load_full_state_dict
    prefixes = tuple(f"model/{n}." for n in names)
    own = {k: v for k, v in S.model_tensors(model, dims.tp_rank).items() if k.startswith(prefixes)}
    dest, key = dict(own), f"model/{POS_EMBED}"  # (replicated over tensor parallelism: no @tp suffix)
    index = read_tensor_index(src.file)
    if resize is not None:  # another shape than the model's: read whole by every process (it is small)
        m = index.state_dict_metadata.get(key)
        if m is None:
            raise ValueError(f"checkpoint.init_from: {src.file} holds no {POS_EMBED}")
        dest[key] = torch.empty(m.size, dtype=m.properties.dtype)
    load_tensors(src.file, dest, index=index)
    pos, dest[key] = dest[key], own[key]  # (the model's own, unchanged, until the resampled one below)
    S.load_model_tensors(model, dest, dims.tp_rank, parts=names)
    if resize is not None:
        try:
            load_full_state_dict(model, {POS_EMBED: resize.apply(pos, dtype)})
        except ValueError as e:
            raise _unfit(src, e) from None


def _load_full_tensors(src: InitSource, model: torch.nn.Module, dims: ParallelDims, names: tuple[str, ...],
                       resize: Optional[PosResize], dtype: Optional[torch.dtype]) -> None:
    """Every process reads the full tensors and keeps its slice and shard, one group at a time (a
    transformer block, or the tensors outside the blocks), each placed before the next is read: a process
    holds one group, not the model (ViT-10B: 40 GB in float32)."""
    from ..parallel.state import load_full_state_dict
    if src.is_export:
        groups = _export_groups(src.file)
    else:
        from ..pretrained import iter_checkpoint_model_state
        groups = iter_checkpoint_model_state(src.file, names, collective=dims.world_size > 1)
    failed, pending = None, resize  # (pending: the position embedding, in one group, not resampled yet)
    # The model's tensors of the parts, each of which some group must give: load_full_state_dict leaves those
    # no group names as they are (randomly initialised), so an export or checkpoint lacking some (a block
    # missing, its JSON describing more) would start the run from them without a word (the own-shards path
    # refuses it: DCP reads every tensor it is given).
    missing = {k for k in model.state_dict() if k.split(".", 1)[0] in names}
    for full in groups:
        missing.difference_update(full)
        # After a failure the rest is still read, not placed: every process makes the same (collective) reads.
        if failed is None:
            try:
                if pending is not None and POS_EMBED in full:
                    full[POS_EMBED], pending = pending.apply(full[POS_EMBED], dtype), None
                load_full_state_dict(model, full)
            except Exception as e:  # a KeyError, ValueError: an export whose tensors its JSON does not describe
                failed = _unfit(src, e) if isinstance(e, (KeyError, ValueError)) else e
        del full  # (before the next group is read)
    if failed is None and pending is not None:
        failed = _unfit(src, KeyError(POS_EMBED))
    if failed is None and missing:
        failed = _unfit(src, KeyError(f"tensors of the model it does not have: {', '.join(sorted(missing)[:5])}"
                                      f"{' ...' if len(missing) > 5 else ''} ({len(missing)})"))
    if failed is not None:
        raise failed


def _export_groups(file: Path) -> Iterator[dict[str, torch.Tensor]]:
    from ..export import iter_export_state
    try:
        yield from iter_export_state(file, prefix="backbone.")
    except ValueError as e:
        raise ValueError(f"checkpoint.init_from: {e}") from None


def _unfit(src: InitSource, e: Exception) -> ValueError:
    why = e.args[0] if e.args else e  # (a KeyError's str() is its message quoted)
    return ValueError(f"checkpoint.init_from: {src.file}: its tensors do not fit the model: {why}")


def same_source(record: Optional[dict], src_value: str) -> bool:
    """Whether a checkpoint's ``init_from`` record names the path ``checkpoint.init_from=src_value`` (as
    written, or where it leads now)."""
    if not isinstance(record, dict):
        return False
    given = init_path(src_value)
    return record.get("path") == given or record.get("resolved") == str(Path(given).resolve())

