"""A multi-process run refuses output folders that some process does not share (a node-local OUT across
nodes), before training, on every process."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seer.train.distributed import MainRankError, check_shared_folders
from tests.dist_utils import run_distributed


def _check(rank, world, shared, local):
    # Rank 1 stands for another node: its OUT is a folder of the same name on its own disk.
    out = Path(shared) if rank == 0 else Path(local)
    out.mkdir(parents=True, exist_ok=True)
    folders = {"OUT": out, "checkpoint.dir": Path(shared) / "ckpt"}
    if rank == 0:
        folders["checkpoint.dir"].mkdir(exist_ok=True)
    try:
        check_shared_folders(folders, wait_s=0.5)
    except RuntimeError as exc:
        return str(exc)
    return None


def _check_shared(rank, world, shared):
    check_shared_folders({"OUT": Path(shared)}, wait_s=0.5)
    torch.distributed.barrier()  # rank 0 has removed its probe
    return sorted(p.name for p in Path(shared).iterdir())


@pytest.mark.dist
def test_a_folder_one_process_cannot_see_is_refused_on_every_process(tmp_path):
    errors = run_distributed(_check, 2, str(tmp_path / "shared"), str(tmp_path / "node1"))
    assert errors[0] == errors[1] and errors[0] is not None
    assert "rank 1 on" in errors[0] and f"cannot see OUT ({tmp_path / 'node1'})" in errors[0]
    assert "cannot see checkpoint.dir" not in errors[0] and ", checkpoint.dir (" not in errors[0]  # it sees that one
    assert list((tmp_path / "shared").iterdir()) == [tmp_path / "shared" / "ckpt"]  # no probe left behind


@pytest.mark.dist
def test_a_shared_folder_passes_and_keeps_no_probe(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.log").write_text("")
    assert run_distributed(_check_shared, 2, str(tmp_path / "out")) == [["train.log"], ["train.log"]]


def _setup_fails(rank, world, out):
    def setup():
        raise FileExistsError(f"{out} is in use by another seer run (pid 1 on elsewhere)")
    try:
        check_shared_folders({"OUT": Path(out)}, wait_s=0.5, main_setup=setup if rank == 0 else None)
    except (MainRankError, FileExistsError) as exc:
        return type(exc).__name__, str(exc)
    return None


@pytest.mark.dist
def test_rank_0_failing_to_set_up_stops_every_rank(tmp_path):
    # (before, the other ranks waited in the probe's broadcast until the process group's timeout)
    errors = run_distributed(_setup_fails, 2, str(tmp_path))
    assert errors[0] == ("FileExistsError", f"{tmp_path} is in use by another seer run (pid 1 on elsewhere)")
    assert errors[1] == ("MainRankError", f"rank 0 could not start the run: FileExistsError: {errors[0][1]}")
