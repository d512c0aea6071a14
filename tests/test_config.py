"""Config: the schema is the one source of truth; each bad value gives one clear line naming the key,
the value and what is allowed; unknown keys get the nearest valid key; --help comes from the schema."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conf import ConfigError, compose, config_hash, schema, validate

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


def test_evaluation_options_that_are_off_leave_run_names_alone(tmp_path):
    """Options added later (transfer, corruptions, black-box) are out of the hash while off, so existing runs
    keep their names (and are reused, not retrained); turning one on makes it another run."""
    base = compose(_base(tmp_path))["run_name"]
    # What the default job was named before those options existed (main at 68597b4, and before).
    assert base == "deacl-digits-8ef31db777"
    assert compose(_base(tmp_path) + ["eval.corruptions.names=[fog]", "eval.blackbox.n_examples=5"])["run_name"] == base
    cfg = compose(_base(tmp_path))
    for section, key in (("corruptions", "root"), ("blackbox", "surrogate")):
        on = {**cfg, "eval": {**cfg["eval"], section: {**cfg["eval"][section], key: "/data/x"}}}
        assert config_hash(on) != config_hash(cfg), section
    assert compose(_base(tmp_path) + ["+data@eval.data=synthetic"])["run_name"] != base


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


def test_l2_autoattack_needs_its_own_radius(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval.autoattack.eps=null is invalid with eval.autoattack.norm=L2: "):
        compose(_base(tmp_path) + ["eval.autoattack.norm=L2"])
    cfg = compose(_base(tmp_path) + ["eval.autoattack.norm=L2", "eval.autoattack.eps=0.5"])
    assert (cfg["eval"]["autoattack"]["norm"], cfg["eval"]["autoattack"]["eps"]) == ("L2", 0.5)
    with pytest.raises(ConfigError, match=r"eval.curve.eps"):
        compose(_base(tmp_path) + ["eval.curve.eps=[0.03,-1]"])


def test_missing_teacher_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"^teacher.checkpoint='.*nope.pt' is invalid: file does not exist"):
        compose(_base(tmp_path) + [f"teacher.checkpoint={tmp_path}/nope.pt"])


def test_missing_beton_and_dataset(tmp_path):
    from trainer.recipes import preflight

    cfg = compose(_base(tmp_path) + ["data=cifar10", f"data.root={tmp_path}/no_cifar_here"])
    with pytest.raises(ConfigError, match=r"^data.root=.* no .beton for split"):
        preflight(cfg)


def test_cli_exits_nonzero_with_one_line_before_starting_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.run", f"output_dir={tmp_path}", "attack.eps=-1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["config error: attack.eps=-1 is invalid: must be a number in [0, 1] "
                     "(pixel scale; 8/255 = 0.0314)"], proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr
    assert not (tmp_path / "ray_results").exists()


@pytest.mark.parametrize("override, message", [
    ("+foo=1", "foo=1 is invalid: no such config key; see --help for the keys"),
    ("method.lamm=1", "method.lamm=1 is invalid: no such config key; did you mean method.lam?"),
    ("+method.lamb=3", "method.lamb=3 is invalid: no such config key; did you mean method.lam?"),
    ("attack.step=3", "attack.step=3 is invalid: no such config key; did you mean attack.steps?"),
    ("+sed=1", "sed=1 is invalid: no such config key; did you mean seed?"),
    ("seed=-5", "seed=-5 is invalid: must be an integer in [0, 2^32)"),
    ("method.train.epochs=2.5", "method.train.epochs=2.5 is invalid: must be an integer >= 1"),
    ("channels_last=2", "channels_last=2 is invalid: allowed: true, false, auto"),
    ("eval.autoattack.n_examples=0", "eval.autoattack.n_examples=0 is invalid: must be null or an integer >= 1"),
])
def test_unknown_keys_and_types(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        compose(_base(tmp_path) + [override])
    assert str(info.value) == message


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"^output_dir='.*file' is invalid: exists and is not a folder"):
        compose([f"output_dir={f}"])


def test_schema_fills_every_default(tmp_path):
    """Option files hold only what they change; the composed config has every schema key."""
    cfg = compose(_base(tmp_path))
    assert cfg["attack"]["gather_negatives"] is True and cfg["method"]["init_from_teacher"] is True
    assert cfg["eval"]["linear"]["lr"] == {"slf": 0.1, "alf": 0.01, "aff": 0.01, "le": 0.1, "rle": 0.01}
    assert validate(cfg) == cfg  # validation of a validated config changes nothing


GROUP_SECTIONS = {"data": schema.Data, "model": schema.Model, "attack": schema.Attack, "eval": schema.Eval,
                  "cluster": schema.Cluster, "tune": schema.Tune, "analysis": schema.Analysis, "study": schema.Study}


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v and not k.startswith("space"):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def _default(model, dotted):
    from pydantic import BaseModel

    node = model.model_construct()
    for part in dotted.split("."):
        node = getattr(node, part, None) if isinstance(node, BaseModel) else None
    return node


@pytest.mark.parametrize("group", [*GROUP_SECTIONS, "method"])
def test_every_option_composes_and_repeats_no_default(tmp_path, group):
    """Every YAML option validates against the schema, and holds only what it changes (the key that
    names the option excepted): the schema is where defaults live."""
    import yaml

    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        extra = ["data.num_classes=5", f"data.root={tmp_path}"] if path.stem == "imagefolder" else []
        prefix = "+" if group in ("analysis", "study") else ""
        compose(_base(tmp_path) + [f"{prefix}{group}={path.stem}", *extra])
        values = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "defaults"}
        model = schema.METHOD_SCHEMAS[path.stem] if group == "method" else GROUP_SECTIONS[group]
        repeated = [k for k, v in _flat(values) if k not in ("name", "arch") and "${" not in str(v)
                    and v == _default(model, k) and not k.startswith("train.")]
        assert not repeated, f"{path.relative_to(ROOT)} repeats the schema's defaults for {repeated}"


def test_registries_match_the_schema():
    from data_pipeline.sources import SYN_MAX_CLASSES
    from trainer.methods import METHOD_REGISTRY
    from trainer.models import DATASET_STATS
    from trainer.models.resnet import ARCHS

    assert set(METHOD_REGISTRY) == set(schema.METHOD_NAMES) == set(schema.METHOD_SCHEMAS)
    assert set(ARCHS) == set(schema.ARCHS)
    assert set(DATASET_STATS) == set(schema.DATASET_STATS_NAMES)
    assert SYN_MAX_CLASSES == schema.SYNTHETIC_MAX_CLASSES


def test_every_key_has_a_meaning():
    missing = []

    def walk(model, prefix):
        for name, info in model.model_fields.items():
            if not info.description:
                missing.append(prefix + name)
            for sub in getattr(info.annotation, "__args__", ()) or (info.annotation,):
                if isinstance(sub, type) and issubclass(sub, schema.Section):
                    walk(sub, f"{prefix}{name}.")

    walk(schema.Root, "")
    for m in schema.METHOD_SCHEMAS.values():
        walk(m, "method.")
    assert not missing, missing


@pytest.mark.parametrize("module", ["trainer.run", "trainer.evaluate", "tune.search", "tune.study",
                                    "data_pipeline.write", "trainer.analyze_representations"])
def test_help_lists_groups_options_and_keys(module):
    import importlib

    from conf.cli import CommandLine  # noqa: F401  (the helper every entry point shares)

    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Config groups" in out and "deacl (default)" in out and "rocl_pgd7" in out
    assert "seed " in out and "an integer in [0, 2^32)" in out and "precision" in out
    assert importlib.import_module(module).__doc__.strip().splitlines()[0] in out


def test_help_of_one_section():
    proc = subprocess.run([sys.executable, "-m", "trainer.run", "--help", "acl"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert "stream_weights" in proc.stdout and "a2a, a2s, ds" in proc.stdout
