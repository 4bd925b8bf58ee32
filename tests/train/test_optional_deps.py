"""The training extras (tensorboard, matplotlib, tqdm) are optional: `pip install .` without them still trains."""
from __future__ import annotations

import sys

from seer.train.metrics import MetricsWriter


def test_progress_bar_without_tqdm_is_a_warning_not_a_crash(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    w = MetricsWriter(tmp_path, active=True, tensorboard=False, progress="on", total_steps=3)
    assert w.bar is None
    w.close()
    assert any("tqdm" in r.getMessage() for r in caplog.records)


def test_plot_without_matplotlib_is_a_warning_not_silence(tmp_path, monkeypatch, caplog):
    """README: each optional extra is skipped with a warning; the plot went missing without a word."""
    from seer.train.plot import plot_metrics
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    records = [{"step": 1, "loss": 3.0, "images_per_s": 10.0}, {"step": 2, "loss": 2.5, "images_per_s": 11.0}]
    assert plot_metrics(records, tmp_path / "plot.png", num_prototypes=32) is None
    assert not (tmp_path / "plot.png").exists()
    assert any("matplotlib is not installed: no plot.png" in r.getMessage() for r in caplog.records)


def test_a_missing_package_is_named_and_a_broken_one_is_not_called_missing(tmp_path, monkeypatch):
    """require() said '<package>, which is not installed' for any ImportError, also when the package is there
    and something it imports is missing (torchvision without pillow): the message named the wrong thing."""
    import pytest

    from seer.deps import MissingDependencyError, require
    (tmp_path / "seer_fake_extra").mkdir()
    (tmp_path / "seer_fake_extra" / "__init__.py").write_text("import seer_fake_dependency_of_it\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError) as e:
        require("seer_fake_extra.sub", "the feature", "fake-extra")
    assert "not installed" not in str(e.value) and "'seer_fake_dependency_of_it'" in str(e.value)
    assert str(e.value).startswith("the feature needs fake-extra, which is installed but cannot be imported")
    with pytest.raises(MissingDependencyError, match=r"^the feature needs nothing-here, which is not installed"):
        require("seer_fake_absent.sub", "the feature", "nothing-here")
    monkeypatch.setitem(sys.modules, "seer_fake_blocked", None)  # (how the CLI tests hide a package)
    with pytest.raises(MissingDependencyError, match=r"^the feature needs blocked, which is not installed"):
        require("seer_fake_blocked", "the feature", "blocked")


def test_a_package_too_old_for_the_module_is_not_called_missing(tmp_path, monkeypatch):
    """torchvision older than transforms.v2 was reported as not installed."""
    import pytest

    from seer.deps import MissingDependencyError, require
    (tmp_path / "seer_fake_old").mkdir()
    (tmp_path / "seer_fake_old" / "__init__.py").write_text("__version__ = '0.1'\n")
    (tmp_path / "seer_fake_old" / "transforms").mkdir()
    (tmp_path / "seer_fake_old" / "transforms" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError) as e:
        require("seer_fake_old.transforms.v2.functional", "the feature", "fake-old")
    assert str(e.value) == ("the feature needs fake-old with the module seer_fake_old.transforms.v2, which the "
                            "installed fake-old 0.1 does not have: upgrade it (pip install -U fake-old)")
