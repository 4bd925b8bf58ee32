"""A run over tar shards with data.exclude set to seer data dedup's report trains on the kept images only, and
resuming it with another exclude file is refused, naming the key."""

import pytest

from seer.cli import main
from seer.config import apply_overrides, preset, validate
from seer.data import DataSourceError
from seer.train import Trainer
from tests.images import image_bytes, write_shard


def test_training_on_tar_shards_without_the_duplicates_the_report_names(tmp_path):
    imgs = [image_bytes(i, (40, 48)) for i in range(10)]
    # 12 members, 2 of them copies: 10 images left, more than one batch (8)
    write_shard(tmp_path / "a.tar", [(f"k{i}.png", imgs[i]) for i in range(6)] + [("k6.png", imgs[0])])
    write_shard(tmp_path / "b.tar", [(f"m{i}.png", imgs[i]) for i in range(6, 10)] + [("n0.png", imgs[7])])
    glob, rep = str(tmp_path / "*.tar"), tmp_path / "dups.tsv"
    assert main(["data", "dedup", glob, "--report", str(rep), "--workers", "0"]) == 0
    cfg = validate(apply_overrides(preset("tiny"), [f"data.source={glob}", f"data.exclude={rep}",
                                                    "train.max_steps=2", "train.threads=1"]))
    out = tmp_path / "run"
    trainer = Trainer(cfg, out)
    assert len(trainer.data) == 10
    names = {trainer.data.source.name(i) for i in range(10)}
    assert f"{tmp_path}/a.tar:k6.png" not in names and f"{tmp_path}/b.tar:n0.png" not in names
    assert trainer.fit()["step"] == 2
    other = tmp_path / "other.tsv"
    other.write_text(rep.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataSourceError, match=r"data.exclude '.*other.tsv' differs from '.*dups.tsv'"):
        Trainer(apply_overrides(cfg, [f"data.exclude={other}", "train.max_steps=3"]), out)
