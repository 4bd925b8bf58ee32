"""data.timeout_s: a worker stuck on a read stops the run with an error naming the key, its workers killed
and reaped, the data position left at the batch that never came (so it is read again on the next try)."""
import dataclasses
import os
import time

import pytest
import torch

from seer.config import CropsConfig, DataConfig
from seer.data import DataTimeoutError, TrainData
from seer.data.check import check_dataset
from tests.images import write_good_images

CROPS = CropsConfig(global_size=32, local_count=2, local_size=16)


class HangingSource:
    """Every read sleeps 30 s, as one from a stuck NFS mount never returns (a module-level class: picklable)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def name(self, i):
        return self.source.name(i)

    def read(self, i):
        time.sleep(30)
        return self.source.read(i)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_good_images(root, 12)
    return root


def _data(folder, tmp_path, **kw) -> TrainData:
    cfg = DataConfig(source=str(folder), batch_size=4, augment_on="workers", crops=CROPS, **kw)
    return TrainData(cfg, seed=0, cache=tmp_path / "index")


def test_a_hung_read_stops_with_an_error_naming_the_key_and_the_batch_is_read_again(folder, tmp_path):
    data = _data(folder, tmp_path, num_workers=1, timeout_s=1)
    data.sampler.advance()  # one step done: the stuck batch is the second
    before = data.state_dict()
    data.dataset.source = HangingSource(data.source)
    data._iter = iter(data._loader())  # made here to see its worker processes
    workers = list(data._iter._workers)
    with pytest.raises(DataTimeoutError, match=r"data\.timeout_s=1 s \(data-parallel rank 0, the batch at epoch 0, "
                                               r"image offset 4 \(step 2 of 3 of that epoch\)\).*a read from a hung "
                                               r"or overloaded filesystem.*raise data\.timeout_s, or set it to 0"):
        data.next()
    assert data.state_dict() == before  # not advanced past the batch that never came
    for w in workers:  # killed and reaped: no zombie left behind
        assert w.exitcode is not None and not os.path.exists(f"/proc/{w.pid}")
    # The same object reads the same batch on the next try, once the filesystem answers (a resume from the
    # last checkpoint replays it the same way: the position is what checkpoints hold).
    data.dataset.source = data.source
    data.cfg = dataclasses.replace(data.cfg, timeout_s=120)  # no race with a busy machine's worker start
    crops, _ = data.next()
    data.close()
    reference = _data(folder, tmp_path, num_workers=0)
    reference.next()
    expected, _ = reference.next()
    assert all(torch.equal(a, b) for a, b in zip(crops, expected, strict=True))


@pytest.mark.parametrize("workers, timeout_s, expected", [(1, 0, 0), (1, 7.5, 7.5), (0, 7.5, 0)])
def test_the_dataloader_gets_the_timeout_with_workers_only(folder, tmp_path, workers, timeout_s, expected):
    # torch has no timeout without worker processes (it refuses one): the key applies to workers only
    data = _data(folder, tmp_path, num_workers=workers, timeout_s=timeout_s)
    assert data._loader().timeout == expected


def test_data_check_stops_on_a_hung_read(folder, monkeypatch):
    from seer.data import check
    monkeypatch.setattr(check._CheckDataset, "__getitem__", lambda self, i: time.sleep(30))  # forked workers see it
    with pytest.raises(DataTimeoutError, match=r"--timeout-s=1 s \(images 1-12 of 12\)"):
        check_dataset(str(folder), workers=1, timeout_s=1)
    for bad in (-1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ValueError, match="--timeout-s must be a finite number >= 0"):
            check_dataset(str(folder), workers=1, timeout_s=bad)
