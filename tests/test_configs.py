"""The shipped configs/ TOML files load into their commands' config dataclasses (no unknown or mistyped keys)."""
from pathlib import Path

import pytest

from edge.config import load_config, tomllib

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _config_class(name: str):
    if name.startswith("teacher"):
        pytest.importorskip("torch")
        from export.train import TrainConfig
        return TrainConfig
    if name.startswith("distill"):
        pytest.importorskip("torch")
        from export.distill import DistillConfig
        return DistillConfig
    from edge.commands.export import ExportConfig
    return ExportConfig


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cls = _config_class(path.name)
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)
    assert {k for k in tomllib.loads(path.read_text())} <= set(cfg.__dataclass_fields__)


def test_teacher_stages_continue_one_run():
    pytest.importorskip("torch")
    from export.train import TrainConfig
    stages = [load_config(TrainConfig, CONFIGS / f) for f in ("teacher.toml", "teacher_finetune.toml", "teacher_cycle2.toml")]
    assert len({s.run_dir for s in stages}) == 1  # each stage resumes the previous one's folder
    assert [s.steps for s in stages] == sorted(s.steps for s in stages)
