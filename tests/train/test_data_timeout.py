"""A run whose data reads hang stops with the data.timeout_s error and writes no checkpoint past the last batch
it trained on; rerun, it resumes from its last checkpoint and reads the batch that never came."""
import time

import pytest

from seer.config import apply_overrides, preset
from seer.data import DataTimeoutError
from seer.data.dataset import DecodedDataset
from seer.train import Trainer, list_checkpoints
from seer.train.checkpoint import read_meta


def test_a_hung_read_stops_the_run_and_the_rerun_resumes(tmp_path, monkeypatch):
    load, reads = DecodedDataset._load, []

    def hang_after_two_batches(self, epoch, index):  # counted in the worker (forked with an empty list)
        reads.append(index)
        if len(reads) > 16:
            time.sleep(30)
        return load(self, epoch, index)

    monkeypatch.setattr(DecodedDataset, "_load", hang_after_two_batches)
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=4", "checkpoint.every=2", "data.num_workers=1",
                                           "data.timeout_s=2", "train.threads=1"])  # 8 digits per step
    out = tmp_path / "run"
    with pytest.raises(DataTimeoutError, match=r"data\.timeout_s=2 s \(data-parallel rank 0, the batch at epoch 0, "
                                               r"image offset 16 \(step 3 of"):
        Trainer(cfg, out).fit()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002"]  # none at the failure
    assert read_meta(out / "checkpoints" / "step_00000002")["data"]["offset"] == 16
    assert "  timeout_s: 2.0\n" in (out / "config.yaml").read_text()
    monkeypatch.undo()  # the filesystem answers again
    # (a generous timeout for the rerun: nothing to wait out, and no race with a busy machine's worker start)
    trainer = Trainer(apply_overrides(cfg, ["data.timeout_s=120"]), out)
    assert trainer.resumed_from.name == "step_00000002"
    assert trainer.fit()["step"] == 4
