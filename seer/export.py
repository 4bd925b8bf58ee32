"""Export the pretrained backbone in timm's ``VisionTransformer`` layout.

``seer export --checkpoint DIR --format timm --out vit.safetensors`` writes

* ``vit.safetensors``: the backbone's tensors under timm's names (seer's ViT uses timm's module layout, so
  the names are the same: cls_token, pos_embed, patch_embed.proj.*, blocks.N.{norm1,attn.qkv,attn.q_norm,
  attn.k_norm,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*, norm.*); no head, no optimizer.
* ``vit.json``: ``{"timm_class": ..., "kwargs": {...}}``, the constructor arguments of
  ``timm.models.vision_transformer.VisionTransformer`` that build exactly this network (``num_classes=0``
  so that the model returns the class-token features), plus the normalisation the backbone was trained
  with, the evaluation image size and ``preprocessing`` (how seer eval prepares an image: the shorter side
  resized to 8/7 of that size, then the centre crop), seer's own ViT config (to rebuild it without timm) and the run's whole config
  (``seer_run_config``: ``seer eval`` of the export uses its evaluation settings and, for
  ``--random-init``, its seed), and ``safetensors_crc32``: the CRC32 of vit.safetensors as written, which
  seer checks whenever it reads the export (:func:`check_export_bytes`; safetensors has no checksum).

:func:`write_export` and :func:`check_out` (the files' atomic replacement and the refusal of an --out whose
JSON another tool or another format's export wrote) serve ``--format onnx`` too (:mod:`seer.export_onnx`),
whose weights may sit in a second file, OUT.onnx.data, replaced with OUT.onnx and never paired with another
export's.

Loading into timm::

    info = json.load(open("vit.json"))
    model = timm.models.vision_transformer.VisionTransformer(**info["kwargs"])
    model.load_state_dict(safetensors.torch.load_file("vit.safetensors"), strict=True)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from .config import to_dict
from .model import ViTConfig
from .out_paths import check_file_paths
from .part_lock import lock_file

TIMM_CLASS = "timm.models.vision_transformer.VisionTransformer"


def timm_kwargs(cfg: ViTConfig) -> dict:
    """Constructor arguments of timm's VisionTransformer for seer's ViT ``cfg``.

    Class-token pooling after the final norm, no fc_norm, no pre-norm, the position embedding covering the
    class token (``no_embed_class=False``), LayerNorm eps from the config, exact GELU, and
    ``dynamic_img_size`` so that other resolutions interpolate the position embedding as seer does.
    """
    return {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans, "num_classes": 0,
            "global_pool": "token", "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
            "mlp_ratio": _mlp_ratio(cfg.embed_dim, cfg.mlp_dim), "qkv_bias": cfg.qkv_bias, "qk_norm": cfg.qk_norm,
            "init_values": _init_values(cfg.layer_scale_init), "class_token": True, "no_embed_class": False,
            "pre_norm": False, "fc_norm": False, "dynamic_img_size": True}


def _mlp_ratio(embed_dim: int, mlp_dim: int) -> float:
    """The ratio for which timm's ``int(embed_dim * mlp_ratio)`` gives back ``mlp_dim``: mlp_dim / embed_dim
    where that survives the float rounding (every preset), else a ratio aimed at mlp_dim + 1/2 (1408 and
    3840 give 3839 with the plain quotient)."""
    for ratio in (mlp_dim / embed_dim, (mlp_dim + 0.5) / embed_dim):
        if int(embed_dim * ratio) == mlp_dim:
            return ratio
    raise ValueError(f"model.mlp_dim={mlp_dim} has no timm mlp_ratio at model.embed_dim={embed_dim}")


def _init_values(layer_scale_init):
    """timm builds LayerScale only for a truthy ``init_values``; seer for any value but None. The exported
    gammas replace the initial value on loading, so a LayerScale that started at 0 exports with 1.0."""
    return 1.0 if layer_scale_init is not None and layer_scale_init == 0 else layer_scale_init


def export_timm(checkpoint: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write OUT.safetensors and OUT.json (module doc) from a training checkpoint; return both paths. The
    tensors are read and written a group at a time (the tensors outside the blocks, then a block each): the
    export holds one block's full tensors, not the backbone's (ViT-10B: 40 GB in float32, and
    ``safetensors.torch.save_file`` copies all of them once more before it writes)."""
    from .eval.datasets import preprocessing_text
    from .pretrained import checkpoint_backbone_groups, checkpoint_config, checkpoint_source
    from .safetensors_stream import write_safetensors
    from .train.checkpoint import file_crc32

    out = Path(out)
    check_out(out, "timm")  # before the checkpoint is read, not after
    checkpoint, source = checkpoint_source(checkpoint)
    cfg = checkpoint_config(checkpoint)
    vit = cfg.model
    # From the config alone: refused before the tensors are read (and CRC-checked), a 10B model's tens of GB.
    if vit.norm_eps != 1e-6:
        raise ValueError(f"model.norm_eps={vit.norm_eps}: timm's VisionTransformer uses LayerNorm eps 1e-6; only "
                         f"such models export to the timm layout")
    specs, groups = checkpoint_backbone_groups(checkpoint)
    size = cfg.eval.image_size or cfg.data.crops.global_size
    info = {"timm_class": TIMM_CLASS, "kwargs": timm_kwargs(vit), "seer_vit_config": dataclasses.asdict(vit),
            "mean": list(cfg.data.crops.mean), "std": list(cfg.data.crops.std),
            "image_size": size, "preprocessing": preprocessing_text(size), "features": "class token (N, D)",
            "source": source, "seer_run_config": to_dict(cfg)}
    json.dumps(info, indent=1)  # (what can fail on the content before the tensors, before any file)

    def write(part: Path) -> str:
        # (A damaged checkpoint file was refused before this, by checkpoint_backbone_groups; a read that fails
        # while the tensors stream leaves write_export nothing to keep, and the earlier export untouched.)
        write_safetensors(part, specs, groups, metadata={"format": "pt", "producer": "seer", "layout": "timm"})
        # Read back (still in the page cache, as a checkpoint's files are): safetensors has no checksum of its
        # own, and a flipped bit in a weight loads without an error.
        return json.dumps(dict(info, **{CRC_KEY: file_crc32(part)}), indent=1)

    return write_export(out, write)


def write_export(out: Path, write: Callable[[Path], str], side: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write the exported file ``out`` and its JSON (OUT.json) so that neither replaces an earlier export
    unless both are complete; return both paths.

    ``write(path)`` writes the exported file at ``path`` (an empty file there already), in a scratch folder
    under ``out``'s own name, and returns the JSON's text; whatever it raises leaves no new file and the
    earlier export (if any) untouched. ``side``: the names of the files that belong with ``out`` beside it
    (ONNX: OUT.onnx.data, the external data that OUT.onnx names): ``write`` writes those its export has next to
    ``path``, under the same final names, and the earlier export's that it does not write are removed
    (:func:`check_out` refused them first if no seer export wrote them).
    """
    json_path = out.with_suffix(".json")
    # The folders made for OUT (outermost first) are removed again where the export fails: an export that
    # writes nothing leaves nothing behind.
    made = [p for p in (*reversed(out.parent.parents), out.parent) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written in full in OUT.part/ (same folder, so the same filesystem) under its final name,
    # then renamed into place. Written in place, a crash between two files (or a full disk on the JSON) left
    # the new weights beside the JSON of the export they replaced: a pair that loads without an error, with
    # another run's normalisation and config. Final names, not .part names: an ONNX file records its external
    # data's file name, which must be the name the data has once in place.
    scratch = scratch_folder(out)
    # One export per --out at a time: a second one would remove the first one's scratch folder, or rename its
    # weights in beside the other's JSON.
    try:
        with lock_file(out.with_name(out.name + ".part.lock"),
                       f"--out {str(out)!r} is being written by another seer export: wait for it to end, or "
                       f"choose another --out"):
            return _write_scratch(out, json_path, scratch, write, side)
    except BaseException:
        for folder in reversed(made):
            try:
                folder.rmdir()  # (only while empty: a kept scratch folder, or another process's file, stays)
            except OSError:
                break
        raise


def _write_scratch(out: Path, json_path: Path, scratch: Path, write: Callable[[Path], str],
                   side: Sequence[str]) -> tuple[Path, Path]:
    """:func:`write_export`'s work, under its lock."""
    _drop_lone_sides(out, side)
    _remove(scratch)  # the name is the export's own: an export killed while writing (or an older seer's file)
    renaming = False
    try:
        # Created here first: where files cannot be made after all (root passes the access check under /proc),
        # the OSError names the path (one line from the CLI) instead of the writer's error and its traceback.
        scratch.mkdir()
        open(scratch / out.name, "wb").close()
        text = write(scratch / out.name)
        (scratch / json_path.name).write_text(text)
        news = [scratch / name for name in (out.name, *side, json_path.name) if (scratch / name).exists()]
        for new in news:
            with open(new, "rb") as f:
                os.fsync(f.fileno())
        # A writer may create its file readable by the owner alone (safetensors: 0600): give it the JSON's mode
        # (what any new file of this process gets), so that whoever can read the export's JSON can read it.
        for new in news[:-1]:
            os.chmod(new, news[-1].stat().st_mode & 0o777)
        # The order, so that a crash between two steps never pairs files of two exports:
        # 1. the old JSON goes first: a crash after it leaves the weights without a JSON (refused by name),
        #    never new weights beside the old JSON;
        # 2. with side files, the old OUT next, before any side file is replaced: an old OUT.onnx never names
        #    a new OUT.onnx.data (same tensor names and offsets where the architecture is the same: it would
        #    load without an error, with the other export's weights). The earlier export's side files that
        #    this one does not write (an inline ONNX export replacing one with external data) are removed just
        #    before it, while the old OUT still names them: removed after it, a crash between the two left a
        #    side file alone that no file names (the scratch OUT names none), refused by check_out as a
        #    user's; removed before it, a crash leaves the old OUT without its JSON, which the next export
        #    replaces;
        # 3. the side files (a crash after it leaves a side file alone, without OUT: check_out takes it for
        #    the export's own only while the scratch folder still holds the OUT that names it, so the scratch
        #    folder is kept where the renames stop half-way, by an exception as by a kill);
        # 4. OUT, whose side files are all in place by now; 5. the JSON, last.
        renaming = True
        json_path.unlink(missing_ok=True)
        for name in side:
            if not (scratch / name).exists():  # the earlier export's, which no file will name any more
                out.with_name(name).unlink(missing_ok=True)
        if side:
            out.unlink(missing_ok=True)
        for name in side:
            if (scratch / name).exists():
                os.replace(scratch / name, out.with_name(name))
        os.replace(scratch / out.name, out)
        renaming = False  # (OUT, in place, names its side files from now on)
        os.replace(scratch / json_path.name, json_path)
    finally:
        if not renaming:  # (kept as the evidence that a lone side file is seer's: step 3 above)
            _remove(scratch)
    return out, json_path


def _drop_lone_sides(out: Path, side: Sequence[str]) -> None:
    """Remove the side files that an export stopped between its renames left without OUT, where seer's (the
    scratch folder's OUT names them): the scratch folder, their only evidence, is about to be replaced, and
    an export stopped while it writes its own (Ctrl-C in the trace, a failed verification) would leave them
    alone without it, refused by the next export as a user's file. Without their OUT they load nowhere."""
    if not side or out.exists():
        return
    fmt = next((f for f, suffix in SUFFIXES.items() if suffix == out.suffix), None)
    for name in side:
        path = out.with_name(name)
        if fmt is not None and path.is_file() and _side_written_by_seer(out, path, fmt):
            path.unlink()


def scratch_folder(out: Path) -> Path:
    """OUT.part/: where :func:`write_export` writes the files before it renames them into place."""
    return out.with_name(out.name + ".part")


def _remove(path: Path) -> None:
    """Remove the file or folder ``path`` if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# The file each --format writes, the JSON beside it named after it.
SUFFIXES = {"timm": ".safetensors", "onnx": ".onnx"}
# What each format may write beside OUT, named after OUT (OUT.onnx.data: ONNX's external data).
SIDE_SUFFIXES = {"timm": (), "onnx": (".data",)}


def side_files(out: Path, fmt: str) -> list[Path]:
    """The files beside ``out`` that belong to the ``fmt`` export there (written or removed with it)."""
    return [out.with_name(out.name + suffix) for suffix in SIDE_SUFFIXES[fmt]]


def check_out(out: Path, fmt: str) -> None:
    """ValueError naming ``out`` where the ``fmt`` export could not be written: not the format's suffix, it or
    its JSON a folder, no files can be created where it goes (the export creates missing folders), its JSON
    exists and is not one that an export of this format wrote (which alone it may replace), or a side file
    (:func:`side_files`) exists that no seer export at ``out`` wrote."""
    suffix = SUFFIXES[fmt]
    if out.suffix != suffix:
        raise ValueError(f"--out must end with {suffix} for --format {fmt}, got {str(out)!r}")
    json_path = out.with_suffix(".json")
    sides = side_files(out, fmt)
    check_file_paths("--out", out, (out, json_path, *sides), make_folders=True)
    if not json_path.exists():
        # Replaced only where an export wrote it (the weights of an export killed between its two renames):
        # without its JSON, a file of that name may be anything the user keeps there.
        if out.exists() and not written_by_seer(out, fmt):
            raise ValueError(f"--out {str(out)!r} exists and is not a file that seer export wrote (and "
                             f"{str(json_path)!r}, an export's JSON, is not beside it); the export would replace "
                             f"it: remove it or choose another --out")
    else:
        found = export_format(json_path)
        if found is None:
            # e.g. --out runs/demo/eval.safetensors: the run's eval.json would be replaced by the export's JSON
            raise ValueError(f"--out {str(out)!r}: {str(json_path)!r} exists and is not a JSON that seer export "
                             f"wrote; the export writes its JSON there and would overwrite it: choose another --out")
        if found != fmt:
            # vit.onnx beside vit.safetensors: both exports' JSON is vit.json, and the timm export needs its own
            raise ValueError(f"--out {str(out)!r}: {str(json_path)!r} is the JSON of the {found} export "
                             f"{str(out.with_suffix(SUFFIXES[found]))!r}, which needs it; the {fmt} export writes "
                             f"its JSON there and would replace it: choose another --out")
    for side in sides:
        if side.exists() and not _side_written_by_seer(out, side, fmt):
            # e.g. torch.onnx's own export: vit.onnx and vit.onnx.data (vit.onnx alone is refused above where no
            # JSON is beside it), or the data of an export killed between its renames whose scratch folder was
            # removed since (write_export's order)
            raise ValueError(f"--out {str(out)!r}: {str(side)!r} exists and is not the external data of the seer "
                             f"export at {str(out)!r} (neither {str(out)!r} nor {str(json_path)!r} names it); the "
                             f"export writes or removes that file: remove it or choose another --out")


def _side_written_by_seer(out: Path, side: Path, fmt: str) -> bool:
    """Whether the side file ``side`` is the one that the seer export at ``out`` names: its JSON's
    ``external_data`` or, without the JSON (an export killed between its renames), OUT's own metadata, or,
    without OUT either (killed after the side files' renames, before OUT's), the metadata of the OUT that the
    scratch folder still holds (the side file is then the new export's or, killed before its rename, the
    earlier export's, whose OUT was removed first: seer's either way)."""
    json_path = out.with_suffix(".json")

    def names_it(path: Path) -> bool:
        return path.is_file() and written_by_seer(path, fmt) and _onnx_metadata(path).get("external_data") == side.name
    try:
        if export_format(json_path) == fmt:
            return json.loads(json_path.read_text()).get("external_data") == side.name
        if out.exists():
            return names_it(out)
        return names_it(scratch_folder(out) / out.name)
    except (OSError, ValueError):  # (changed since it was read)
        return False


# The mark each format's file carries (safetensors' header metadata; the ONNX model's metadata_props).
SEER_MARK = ("producer", "seer")


def written_by_seer(path: Path, fmt: str) -> bool:
    """Whether ``path`` is a file that seer's ``fmt`` export wrote (its mark, read without the weights)."""
    key, value = SEER_MARK
    try:
        if fmt == "timm":
            from safetensors import SafetensorError, safe_open
            try:
                with safe_open(str(path), framework="pt") as f:  # (the header only: the tensors are not read)
                    meta = f.metadata() or {}
            except SafetensorError:
                return False
            return meta.get(key) == value and meta.get("layout") == "timm"
        return _onnx_metadata(path).get(key) == value
    except (OSError, ValueError):
        return False


def _onnx_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX file ``path``, read by walking the ModelProto's top-level fields (the
    graph and its weights are skipped, not parsed); ValueError where it is not a protobuf message."""
    def varint(f) -> int:
        shift = result = 0
        while True:
            b = f.read(1)
            if not b or shift > 63:
                raise ValueError("not a protobuf message")
            result |= (b[0] & 0x7F) << shift
            shift += 7
            if not b[0] & 0x80:
                return result

    def fields(data: bytes) -> dict[int, bytes]:  # (the string fields of a small message)
        import io
        g, found = io.BytesIO(data), {}
        while g.tell() < len(data):
            tag = varint(g)
            if tag & 7 != 2:
                raise ValueError("not a metadata entry")
            found[tag >> 3] = g.read(varint(g))
        return found

    meta = {}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while f.tell() < size:
            tag = varint(f)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                varint(f)
            elif wire == 1 or wire == 5:
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            elif wire == 2:
                length = varint(f)
                if number == 14:  # ModelProto.metadata_props: StringStringEntryProto {1: key, 2: value}
                    entry = fields(f.read(length))
                    meta[entry.get(1, b"").decode(errors="replace")] = entry.get(2, b"").decode(errors="replace")
                else:
                    f.seek(length, os.SEEK_CUR)
            else:
                raise ValueError("not a protobuf message")
            if number == 0 or f.tell() > size:
                raise ValueError("not a protobuf message")
    return meta


def export_format(path: Path) -> Optional[str]:
    """The --format of the export that wrote the JSON ``path`` ("timm" or "onnx"), or None where no seer export
    did (or it cannot be read)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or "seer_vit_config" not in info:
        return None
    if info.get("timm_class") == TIMM_CLASS:
        return "timm"
    if info.get("format") == "onnx" and info.get("producer") == "seer":
        return "onnx"
    return None


def export_source(info: dict) -> Optional[dict]:
    """{'checkpoint', 'step'}: the checkpoint an export was made from, as its JSON ``info`` records it (None for
    an export written before it recorded one, or a JSON that is not seer's)."""
    src = info.get("source")
    if isinstance(src, dict) and isinstance(src.get("checkpoint"), str) and isinstance(src.get("step"), int) \
            and not isinstance(src["step"], bool):
        return {"checkpoint": src["checkpoint"], "step": src["step"]}
    return None


CRC_KEY = "safetensors_crc32"  # the JSON's CRC32 (8 hex digits) of the .safetensors file as written


def check_export_bytes(path: str | Path, info: Optional[dict] = None) -> None:
    """ValueError naming ``path`` where its bytes are not those seer export wrote (the CRC32 its JSON records;
    exports written before the JSON had one are not checked): a flipped bit in a weight would load without an
    error, as it would from a checkpoint's shard (which are checked the same way). One read of the file, at
    about 2 GB/s (zlib's CRC32)."""
    from .train.checkpoint import file_crc32
    info = export_info(path) if info is None else info
    want = info.get(CRC_KEY)
    if want is None:
        return
    got = file_crc32(Path(path))
    if got != want:
        raise ValueError(f"{path}: its bytes changed since seer export wrote it (CRC32 {got}, "
                         f"{Path(path).with_suffix('.json').name} says {want}): a damaged copy? export it again "
                         f"from the checkpoint")


def read_export(path: str | Path) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """(seer ViT config, state dict) of an exported file; ValueError naming the file that is not what seer
    export writes, or whose bytes changed since (:func:`check_export_bytes`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    info = export_info(path)
    vit = export_vit_config(path, info)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a safetensors file that seer can read ({type(e).__name__}: {e})") from None
    check_export_bytes(path, info)  # (after: a file that is no safetensors at all is named as such)
    return vit, state


def iter_export_state(path: str | Path, prefix: str = "") -> Iterator[dict[str, torch.Tensor]]:
    """:func:`read_export`'s state dict a group at a time (:func:`seer.train.state.tensor_groups`: the tensors
    outside the blocks, then a block each), names prefixed with ``prefix``, each tensor read on its own from
    the file (``safetensors.safe_open``, what read_export's ``load_file`` does for all at once): a caller that
    places a group before taking the next holds one group, not the file. The same checks and ValueErrors as
    read_export, the JSON's before any tensor is read."""
    from safetensors import SafetensorError, safe_open

    from .train.state import tensor_groups

    def group(keys: list[str]) -> dict[str, torch.Tensor]:
        # Opened for each group: the file is memory-mapped, and the pages read stay in the process's resident
        # memory until it is closed (the whole file by the last group, were it opened once).
        with safe_open(str(path), framework="pt") as f:
            return {prefix + k: f.get_tensor(k) for k in keys}

    info = export_info(path)
    export_vit_config(path, info)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        check_export_bytes(path, info)  # (before any tensor; after the header: no safetensors is named as such)
        yield from (group(g) for g in tensor_groups(keys))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a safetensors file that seer can read ({type(e).__name__}: {e})") from None


def export_vit_config(path: str | Path, info: Optional[dict] = None) -> ViTConfig:
    """The seer ViT config in the JSON next to the exported ``path`` (``info``: that JSON, if already read);
    ValueError naming that JSON where it is no seer export's (another tool's JSON, an edited or newer one)."""
    info = export_info(path) if info is None else info
    vit = info.get("seer_vit_config")
    try:
        return ViTConfig(**vit)
    except TypeError as e:  # not a mapping, or keys ViTConfig does not have
        raise ValueError(f"{Path(path).with_suffix('.json')}: 'seer_vit_config' is not a seer ViT config "
                         f"({e})") from None


def export_info(path: str | Path) -> dict:
    """The JSON that seer export wrote next to the .safetensors file ``path``; FileNotFoundError naming
    whichever of the two is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such exported file (seer export writes FILE.safetensors and FILE.json)")
    info_path = path.with_suffix(".json")
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} (written by seer export next to the .safetensors) is missing")
    try:
        info = json.loads(info_path.read_text())
    except ValueError as e:
        raise ValueError(f"{info_path}: not the JSON that seer export writes ({e})") from None
    missing = [k for k in ("seer_vit_config", "mean", "std", "image_size")
               if not isinstance(info, dict) or k not in info]
    if missing:
        raise ValueError(f"{info_path}: not the JSON that seer export writes (no {', '.join(map(repr, missing))})")
    return info


def load_timm(path: str | Path):
    """The exported backbone as a timm VisionTransformer (strict load; its bytes checked as
    :func:`read_export` checks them); needs timm."""
    import timm.models.vision_transformer as tv
    from safetensors.torch import load_file
    info = json.loads(Path(path).with_suffix(".json").read_text())
    model = tv.VisionTransformer(**info["kwargs"])
    state = load_file(str(path))
    check_export_bytes(path, info)
    model.load_state_dict(state, strict=True)
    return model.eval()
