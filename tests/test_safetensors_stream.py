"""seer.safetensors_stream: a .safetensors file written a group at a time is the file save_file writes."""
import random
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seer.safetensors_stream import write_safetensors

META = {"format": "pt", "producer": "seer"}


def _tensors(rng: random.Random) -> dict[str, torch.Tensor]:
    """Fresh random tensors of every dtype class, odd shapes, a scalar and an empty one, names in no order."""
    out = {}
    for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool,
                               torch.float64, torch.uint8, torch.float32, torch.bfloat16)):
        shape = tuple(rng.randint(1, 7) for _ in range(rng.randint(1, 3)))
        t = torch.randn(shape, dtype=torch.float64) * 10
        out[f"blocks.{rng.randint(0, 99)}.t{i}"] = t > 0 if dtype == torch.bool else t.to(dtype)
    out["scalar"], out["empty"] = torch.randn(()), torch.zeros(0, 3, dtype=torch.bfloat16)
    out["poids_é"] = torch.randn(2)  # (a name that is not ASCII: UTF-8 in the header, as safetensors writes it)
    out["strided"] = torch.randn(5, 9)[:, 1::2]  # (written as its values in C order)
    return out


def _specs(ts):
    return {k: (v.dtype, tuple(v.shape)) for k, v in ts.items()}


def test_groups_in_any_order_give_the_file_save_file_writes(tmp_path):
    rng = random.Random()
    ts = _tensors(rng)
    names = list(ts)
    rng.shuffle(names)
    cut = sorted(rng.sample(range(1, len(names)), 3))
    groups = [{k: ts[k] for k in names[a:b]} for a, b in zip([0] + cut, cut + [len(names)])]
    write_safetensors(tmp_path / "ours.safetensors", _specs(ts), groups, META)
    got = load_file(tmp_path / "ours.safetensors")
    assert got.keys() == ts.keys()
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == META
    # The same bytes as safetensors' own writer (the layout, header and padding of the pinned version, 0.8.0):
    # any reader of its files reads ours. (With one metadata entry: save_file writes several in the order of
    # a Rust HashMap, which varies between processes.)
    write_safetensors(tmp_path / "ours.safetensors", _specs(ts), groups, {"format": "pt"})
    save_file({k: v.contiguous() for k, v in ts.items()}, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_each_group_is_let_go_before_the_next_is_taken(tmp_path):
    """A caller whose iterator makes each group when it is asked for holds one group at a time."""
    made = []

    def groups():
        for i in range(4):
            assert all(r() is None for r in made), f"group {i} made while an earlier one is still held"
            g = {f"t{i}": torch.randn(100, 7), f"u{i}": torch.randn(3)}
            made.extend(weakref.ref(t) for t in g.values())
            yield g
            del g

    specs = {f"{n}{i}": (torch.float32, (100, 7) if n == "t" else (3,)) for i in range(4) for n in "tu"}
    write_safetensors(tmp_path / "x.safetensors", specs, groups(), META)
    assert len(load_file(tmp_path / "x.safetensors")) == 8


@pytest.mark.parametrize("case, match", [
    ("extra", "tensor 'z': not in the specs"),
    ("twice", "tensor 'a': given twice"),
    ("shape", r"tensor 'b': torch.float32 \(2, 3\), expected torch.float32 \(3, 2\)"),
    ("dtype", r"tensor 'b': torch.float64 \(3, 2\), expected torch.float32"),
    ("missing", r"tensors never given: b \(1\)"),
])
def test_a_tensor_that_differs_from_the_specs_is_named(tmp_path, case, match):
    a, b = torch.randn(4), torch.randn(3, 2)
    groups = {"extra": [{"a": a, "b": b, "z": a}], "twice": [{"a": a}, {"a": a, "b": b}],
              "shape": [{"a": a, "b": b.reshape(2, 3)}], "dtype": [{"a": a, "b": b.double()}],
              "missing": [{"a": a}]}[case]
    with pytest.raises(ValueError, match=match):
        write_safetensors(tmp_path / "x.safetensors", {"a": (a.dtype, (4,)), "b": (b.dtype, (3, 2))}, groups, META)


def test_a_dtype_without_a_safetensors_code_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"tensor 'c': dtype torch.complex64 has no safetensors code"):
        write_safetensors(tmp_path / "x.safetensors", {"c": (torch.complex64, (2,))}, [], META)
    assert not (tmp_path / "x.safetensors").exists()
