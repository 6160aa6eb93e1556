"""common.config: merging, strict keys/types/choices, required values, overrides."""
import pytest
import yaml

from common import config
from common.config import REQUIRED, UserError


def test_defaults_presets_file_and_overrides_in_order(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"data": {"name": "cifar10"}, "optim": {"lr": 2}}))
    cfg = config._parse(["--config", str(f), "--set", "optim.lr=0.5", "model.width=16"], {"loss": {"t": 2.0}})
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)   # --set beats file
    assert cfg.model.width == 16 and cfg.loss.t == 2.0                 # method defaults present
    assert cfg.augment.blur_p == [0.0, 0.0]                           # CIFAR preset: no blur
    assert cfg.name == "run"                                          # from the file stem
    f.write_text(yaml.safe_dump({"data": {"name": "cifar10"}, "augment": {"blur_p": [0.5, 0.5]}}))
    assert config._parse(["--config", str(f)]).augment.blur_p == [0.5, 0.5]  # the file beats the preset


def test_unknown_key_names_key_and_valid_choices(tmp_path):
    with pytest.raises(UserError) as e:
        config._parse(["--set", "optim.lrr=0.1"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "Did you mean 'optim.lr'" in msg and "weight_decay" in msg and "\n" not in msg


def test_wrong_type_and_bad_choice():
    with pytest.raises(UserError, match=r"'optim.lr' expects float.*got str 'fast'"):
        config._parse(["--set", "optim.lr=fast"])
    with pytest.raises(UserError, match="expects bool"):
        config._parse(["--set", "data.download=3"])
    with pytest.raises(UserError, match="expects int"):
        config._parse(["--set", "optim.epochs=1.5"])
    with pytest.raises(UserError, match="'optim.name' = 'rmsprop' is not one of: lars, sgd, adam, adamw"):
        config._parse(["--set", "optim.name=rmsprop"])
    with pytest.raises(UserError, match="must be a mapping"):
        config._parse(["--set", "optim=3"])


def test_required_value_must_be_given():
    with pytest.raises(UserError, match="missing required config value 'loss.k'"):
        config._parse([], {"loss": {"k": REQUIRED}}, None, "m")
    assert config._parse(["--set", "loss.k=4"], {"loss": {"k": REQUIRED}}, None, "m").loss.k == 4


def test_parse_exits_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse(["--set", "optim.lr=abc"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: config key 'optim.lr'")


def test_override_values_parse_as_yaml_and_numbers():
    cfg = config.parse(["--set", "optim.lr=1e-4", "augment.blur_p=[0.5,0]", "data.download=true", "name=x1"])
    assert cfg.optim.lr == 1e-4 and cfg.augment.blur_p == [0.5, 0.0] and cfg.data.download is True


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        config._parse(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        config._parse(["--config", str(bad)])


def test_saved_config_round_trips(tmp_path):
    cfg = config._parse(["--set", "optim.lr=0.7", "name=x"])
    config.save(cfg, tmp_path / "config.yaml")
    again = config._parse(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg


def test_base_file_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 1.5, epochs: 300}\nmodel: {arch: resnet18}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim: {epochs: 10}\n")
    cfg = config._parse(["--config", str(tmp_path / "child.yaml")])
    assert cfg.optim.lr == 1.5 and cfg.optim.epochs == 10 and cfg.name == "child"
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="loops back"):
        config._parse(["--config", str(tmp_path / "loop.yaml")])
