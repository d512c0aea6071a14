"""Config validation: each bad value gives one clear line naming the key, value and what is allowed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, compose

ROOT = Path(__file__).resolve().parent.parent


def _base(tmp_path: Path) -> list[str]:
    return [f"output_dir={tmp_path}/out"]


def test_default_config_composes_and_validates(tmp_path):
    cfg = compose(_base(tmp_path))
    assert cfg["method"]["name"] == "deacl"
    assert cfg["teacher"]["method"]["name"] == "simclr"
    assert cfg["data"]["name"] == "digits"
    assert cfg["cluster"]["num_workers"] == 1
    assert Path(cfg["output_dir"]).is_absolute() and Path(cfg["cluster"]["storage_path"]).is_absolute()
    assert cfg["run_name"].startswith("deacl-digits-")


def test_run_name_is_deterministic_and_config_dependent(tmp_path):
    a = compose(_base(tmp_path))["run_name"]
    b = compose(_base(tmp_path))["run_name"]
    c = compose(_base(tmp_path) + ["method.lam=1.0"])["run_name"]
    assert a == b != c


@pytest.mark.parametrize("override, key, allowed", [
    ("attack.eps=-0.1", "attack.eps", "[0, 1]"),
    ("attack.steps=0", "attack.steps", ">= 1"),
    ("attack.gather_negatives=sometimes", "attack.gather_negatives", "true, false"),
    ("eval.pgd.steps=0", "eval.pgd.steps", ">= 1"),
    ("method=nosuchmethod", "method", "deacl"),
    ("method.name=nosuchmethod", "method.name", "simclr"),
    ("method.lam=-1", "method.lam", ">= 0"),
    ("method.train.optimizer=adamw", "method.train.optimizer", "sgd"),
    ("teacher.method.temperature=0", "teacher.method.temperature", "> 0"),
    ("model.arch=vgg", "model.arch", "resnet18"),
    ("eval.protocols=[slf,xyz]", "eval.protocols", "alf"),
    ("cluster.placement_strategy=RANDOM", "cluster.placement_strategy", "STRICT_SPREAD"),
    ("recipe=bogus", "recipe", "deacl"),
])
def test_bad_values_are_named(tmp_path, override, key, allowed):
    with pytest.raises(ConfigError) as info:
        compose(_base(tmp_path) + [override])
    msg = str(info.value)
    assert msg.startswith(key + "="), msg
    assert allowed in msg and "\n" not in msg


def test_batch_not_divisible_by_workers(tmp_path):
    with pytest.raises(ConfigError, match=r"method.train.batch_size=128 .*num_workers=3"):
        compose(_base(tmp_path) + ["cluster.num_workers=3"])


def test_missing_teacher_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"^teacher.checkpoint='.*nope.pt' is invalid: file does not exist"):
        compose(_base(tmp_path) + [f"teacher.checkpoint={tmp_path}/nope.pt"])


def test_missing_beton_and_dataset(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.root=.* no .beton for split"):
        compose(_base(tmp_path) + ["data=cifar10", f"data.root={tmp_path}/no_cifar_here"])


def test_cli_exits_nonzero_with_one_line_before_starting_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.run", f"output_dir={tmp_path}", "attack.eps=-1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["config error: attack.eps=-1 is invalid: must be a number in [0, 1] "
                     "(pixel scale; 8/255 = 0.0314)"], proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr
    assert not (tmp_path / "ray_results").exists()
