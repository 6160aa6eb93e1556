"""common.config: merging, strict keys/types/choices, required values, overrides, --help."""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common import config
from common.config import REQUIRED, UserError

import byol_uniform

M = byol_uniform.DEFAULTS  # a script's defaults add its paper's optim/ema/model keys to the shared BASE


def parse(argv, defaults=M):
    return config._parse(argv, defaults)


def test_defaults_presets_file_and_overrides_in_order(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"data": {"name": "cifar10"}, "optim": {"lr": 2}}))
    cfg = parse(["--config", str(f), "--set", "optim.lr=0.5", "model.width=16"])
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)   # --set beats file
    assert cfg.model.width == 16 and cfg.loss.t == 2.0                 # method defaults present
    assert cfg.augment.blur_p == [0.0, 0.0]                           # CIFAR preset: no blur
    assert cfg.name == "run"                                          # from the file stem
    f.write_text(yaml.safe_dump({"data": {"name": "cifar10"}, "augment": {"blur_p": [0.5, 0.5]}}))
    assert parse(["--config", str(f)]).augment.blur_p == [0.5, 0.5]  # the file beats the preset


def test_unknown_key_names_key_and_valid_choices(tmp_path):
    with pytest.raises(UserError) as e:
        parse(["--set", "optim.lrr=0.1"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "Did you mean 'optim.lr'" in msg and "weight_decay" in msg and "\n" not in msg


def test_wrong_type_and_bad_choice():
    with pytest.raises(UserError, match=r"'optim.lr' expects float.*got str 'fast'"):
        parse(["--set", "optim.lr=fast"])
    with pytest.raises(UserError, match="expects bool"):
        parse(["--set", "data.download=3"])
    with pytest.raises(UserError, match="expects int"):
        parse(["--set", "optim.epochs=1.5"])
    with pytest.raises(UserError, match="'optim.name' = 'rmsprop' is not one of: lars, sgd, adam, adamw"):
        parse(["--set", "optim.name=rmsprop"])
    with pytest.raises(UserError, match="must be a mapping"):
        parse(["--set", "optim=3"])


def test_required_value_must_be_given():
    with pytest.raises(UserError, match="missing required config value 'loss.k'"):
        config._parse([], {"loss": {"k": REQUIRED}}, None, "m")
    assert config._parse(["--set", "loss.k=4"], {"loss": {"k": REQUIRED}}, None, "m").loss.k == 4


def test_parse_exits_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse(["--set", "optim.lr=abc"], M)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: config key 'optim.lr'")


def test_override_values_parse_as_yaml_and_numbers():
    cfg = config.parse(["--set", "optim.lr=1e-4", "augment.blur_p=[0.5,0]", "data.download=true", "name=x1"], M)
    assert cfg.optim.lr == 1e-4 and cfg.augment.blur_p == [0.5, 0.0] and cfg.data.download is True


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        parse(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        parse(["--config", str(bad)])


def test_saved_config_round_trips(tmp_path):
    cfg = parse(["--set", "optim.lr=0.7", "name=x"])
    config.save(cfg, tmp_path / "config.yaml")
    again = parse(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg


def test_base_file_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 1.5, epochs: 300}\nmodel: {arch: resnet18}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim: {epochs: 10}\n")
    cfg = parse(["--config", str(tmp_path / "child.yaml")])
    assert cfg.optim.lr == 1.5 and cfg.optim.epochs == 10 and cfg.name == "child"
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="loops back"):
        parse(["--config", str(tmp_path / "loop.yaml")])


@pytest.mark.parametrize("setting, says", [
    ("optim.lr=-0.1", "'optim.lr' = -0.1 is out of range: allowed x >= 0"),
    ("ema.tau=1.5", "'ema.tau' = 1.5 is out of range: allowed 0 <= x <= 1"),
    ("optim.epochs=0", "'optim.epochs' = 0 is out of range: allowed x >= 1"),
    ("optim.epochs=-1", "'optim.epochs' = -1 is out of range"),
    ("log.every=0", "'log.every' = 0 is out of range: allowed x >= 1"),
    ("checkpoint.every=0", "'checkpoint.every' = 0 is out of range"),
    ("optim.accum_steps=0", "'optim.accum_steps' = 0 is out of range"),
    ("optim.batch_size=0", "'optim.batch_size' = 0 is out of range"),
    ("eval.knn_k=[]", "'eval.knn_k' = [] is out of range: allowed x >= 1, not empty"),
    ("eval.knn_k=[200,0]", "'eval.knn_k' = [200, 0] is out of range"),
    ("augment.crop_scale=[1.0,0.08]",
     "'augment.crop_scale' = [1.0, 0.08] is out of range: allowed 0 < x <= 1, increasing"),
    ("eval.knn_t=0", "'eval.knn_t' = 0.0 is out of range: allowed x > 0"),
    ("augment.flip_p=2", "'augment.flip_p' = 2.0 is out of range"),
    ("name=../elsewhere", "must be a plain folder name"),
    ("name=/abs/path", "must be a plain folder name"),
])
def test_values_out_of_range_are_one_line_naming_key_value_and_range(setting, says):
    with pytest.raises(UserError) as e:
        parse(["--set", setting])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_in_range_reads_bounds_lists_and_flags():
    assert config.in_range(0.5, "0 < x <= 1") and not config.in_range(0, "0 < x <= 1")
    assert config.in_range([0.08, 1.0], "0 < x <= 1, increasing")
    assert not config.in_range([1.0, 0.5], "x > 0, increasing")
    assert not config.in_range([], "x >= 1, not empty") and config.in_range([], "x >= 1")
    assert config.in_range(3, "x >= 1; a hint after the semicolon is not part of the range")


# ---------------------------------------------------------------------- issue #24, second round
@pytest.mark.parametrize("setting, says", [
    ("data.image_size=1", "'data.image_size' = 1 is out of range: allowed x >= 2"),
    ("augment.crop_scale=[0.5]", "'augment.crop_scale' = [0.5] is out of range: allowed 0 < x <= 1, increasing, "
                                 "length 2 ([min, max])"),
    ("augment.crop_ratio=[0.75,1,1.3]", "'augment.crop_ratio' = [0.75, 1.0, 1.3] is out of range"),
    ("augment.blur_sigma=[0.1]", "'augment.blur_sigma' = [0.1] is out of range"),
    ("augment.jitter=[0.4]", "'augment.jitter' = [0.4] is out of range: allowed x >= 0, length 4"),
    ("data.synthetic.size=0", "'data.synthetic.size' = 0 is out of range: allowed x >= 1"),
    ("data.synthetic.train_size=-5", "'data.synthetic.train_size' = -5 is out of range: allowed x >= 1"),
    ("data.synthetic.test_size=0", "'data.synthetic.test_size' = 0 is out of range: allowed x >= 2"),
    ("data.synthetic.test_size=1", "'data.synthetic.test_size' = 1 is out of range"),
    ("out_dir=", "out_dir='' is empty"),
])
def test_values_that_crashed_inside_the_old_ranges_are_one_line(setting, says):
    with pytest.raises(UserError) as e:
        parse(["--set", setting])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_in_range_length_flag():
    assert config.in_range([0.1, 2.0], "x > 0, increasing, length 2")
    assert not config.in_range([0.1], "x > 0, increasing, length 2")
    assert not config.in_range([0.4, 0.4, 0.2], "x >= 0, length 4; a hint")


def test_smallest_allowed_values_are_accepted():
    cfg = parse(["--set", "data.image_size=2", "data.synthetic.size=1", "data.synthetic.train_size=1",
                 "data.synthetic.test_size=2", "augment.jitter=[0,0,0,0]"])
    assert cfg.data.image_size == 2


def test_yaml_error_keeps_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1\n  x: : 2\n")
    with pytest.raises(UserError) as e:
        parse(["--config", str(bad)])
    assert "line 3, column 6" in str(e.value) and "mapping values are not allowed here" in str(e.value)


def test_missing_base_file_names_the_file_that_refers_to_it(tmp_path):
    (tmp_path / "child.yaml").write_text("base: nope.yaml\noptim: {epochs: 10}\n")
    with pytest.raises(UserError) as e:
        parse(["--config", str(tmp_path / "child.yaml")])
    msg = str(e.value)
    assert str(tmp_path / "child.yaml") in msg and "base: nope.yaml" in msg and str(tmp_path / "nope.yaml") in msg


# ---------------------------------------------------------------------- issue #34: --help lists every key
SCRIPTS = ("byol_uniform", "byol_mhe", "msbreg", "raft", "decorr_nostopgrad", "center_penalty")
ROOT = Path(__file__).resolve().parents[1]


def _leaves(d, prefix=""):
    """Every (key, default) that --set accepts: the leaves of the defaults (BASE <- the script's DEFAULTS)."""
    for k, v in d.items():
        yield from _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]


def _help(script, monkeypatch, capsys, *argv):
    """{key: [default, allowed, meaning]} of ``python <script>.py --help ...``, run by the script's own parse in this
    process (as __main__, whose DEFAULTS' comments it reads), and the whole output."""
    mod = importlib.import_module(script)
    monkeypatch.setitem(sys.modules, "__main__", mod)
    with pytest.raises(SystemExit) as e:
        config.parse(["--help", *argv], mod.DEFAULTS, getattr(mod, "CHOICES", None), script)
    out = capsys.readouterr().out
    assert e.value.code == 0
    table = out.split("config keys (x: the value or each list item):\n")[-1]
    rows = [re.split(r" {2,}", line, maxsplit=3) for line in table.splitlines()]
    assert len({r[0] for r in rows}) == len(rows), "one line per key"
    return {r[0]: r[1:] + [""] * (4 - len(r)) for r in rows}, out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_key_with_its_default_type_range_and_meaning(script, monkeypatch, capsys):
    rows, out = _help(script, monkeypatch, capsys)
    mod = importlib.import_module(script)
    defaults, choices = config.merge(config.BASE, mod.DEFAULTS), {**config.CHOICES, **getattr(mod, "CHOICES", {})}
    keys = dict(_leaves(defaults))
    assert set(rows) == set(keys) and "--set KEY=VALUE" in out
    for key, default in keys.items():
        shown, allowed, meaning = rows[key]
        # the printed default, given to --set, is the default (name: null is the config file's name; --set name=null
        # names a run "null", as any text given for name is kept as written)
        value = None if key == "name" else config.parse_overrides([f"{key}={shown}"])
        for part in key.split(".") if value is not None else ():
            value = value[part]
        assert config._check_value(key, default, value, "--help") == default, (key, shown)
        spec = choices.get(key)
        if isinstance(spec, tuple):  # the choices the check accepts
            assert allowed.split("|") == [str(c).lower() if isinstance(c, bool) else str(c) for c in spec], key
        elif isinstance(spec, str):  # the range the check applies
            assert allowed.endswith(spec.split(";")[0].strip().removeprefix("x " * (not isinstance(default, list))))
        if key in dict(_leaves(config.BASE)) or key in config.SCRIPT_KEYS:
            assert meaning, f"{key}: every key of BASE has a trailing comment, read as its meaning"
    assert rows["optim.lr"][0] == str(mod.DEFAULTS["optim"]["lr"])  # the script's default, not BASE's


def test_help_meaning_is_the_trailing_comment(monkeypatch, capsys):
    rows, _ = _help("byol_uniform", monkeypatch, capsys)
    uni = "λ_uni of Eq. 7 (§4; App. D lists uni_val=0.1); 0 = plain BYOL"
    assert rows["loss.lambda_uni"] == ["0.125", "float", uni]  # the script's own comment
    assert rows["augment.path"][2].endswith("| hybrid: decode + crop + flip in workers, colour/blur/solarise on the "
                                            "device")  # a comment continued on the next line
    lr = "base learning rate (see optim.lr_scaling); 0 keeps the initial weights (a random-init baseline)"
    assert rows["optim.lr"][1:] == ["float >= 0", lr]  # SCRIPT_KEYS, then the range's hint


def test_comments_reads_trailing_comments_and_their_continuation(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('X = 1  # not D\n'
                 'D = {"a": 1,  # one\n'
                 '     "b": {"c": [1,\n'
                 '                 2],  # two\n'
                 '                      # and more\n'
                 '           "d": 3},\n'
                 '     # a header, not a continuation\n'
                 '     "e": 4, "f": 5}  # e and f\n')
    assert config._comments(f, "D") == {"a": "one", "b.c": "two and more", "e": "e and f", "f": "e and f"}


def test_help_prefix_shows_only_that_section(monkeypatch, capsys):
    rows, out = _help("byol_uniform", monkeypatch, capsys, "optim")
    assert set(rows) == {k for k, _ in _leaves(config.merge(config.BASE, M)) if k.startswith("optim.")}
    assert "usage" not in out and "optim.lr" in rows
    assert _help("raft", monkeypatch, capsys, "data.synthetic")[0].keys() == {
        f"data.synthetic.{k}" for k in config.BASE["data"]["synthetic"]}


def test_help_unknown_prefix_is_one_line_naming_the_sections(capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            config.parse([flag, "optimiser"], M)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --help optimiser")
        assert all(s in err[0] for s in ("augment", "optim", "ema", "loss"))


def test_help_of_a_script_run_by_python():
    p = subprocess.run([sys.executable, "byol_uniform.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("optim.lr "))
    assert line.split()[:4] == ["optim.lr", "1.5", "float", ">="] and "base learning rate" in line
    assert "t of Eq. 3" in p.stdout  # a comment of the script's own DEFAULTS


# ---------------------------------------------------------------------- issue #35, third round
def test_a_latin1_config_file_is_one_line_with_the_byte(tmp_path):
    f = tmp_path / "l.yaml"
    f.write_bytes("# réglages: café\noptim:\n  lr: 1.0\n".encode("latin-1"))
    with pytest.raises(UserError) as e:
        parse(["--config", str(f)])
    assert str(e.value) == f"{f}: not UTF-8 (byte 3: 0xe9); save it as UTF-8"
    f.write_text("# réglages: café\noptim:\n  lr: 1.0\n", encoding="utf-8")
    assert parse(["--config", str(f)]).optim.lr == 1.0


@pytest.mark.parametrize("text", ["", "# only comments\n\n# nothing else\n", "{}\n"])
def test_a_config_file_without_settings_is_refused(tmp_path, text):
    """It would run the script's (paper) defaults under the file's name, silently."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        parse(["--config", str(f)])
    assert str(e.value).startswith(f"config file {f} holds no settings") and "\n" not in str(e.value)


@pytest.mark.parametrize("setting", ["optim.lr=.inf", "optim.lr=inf", "optim.lr=-.inf", "optim.weight_decay=.inf",
                                     "loss.lambda_uni=.nan", "augment.blur_p=[0.5,.nan]", "data.mean=[.nan,0,0]"])
def test_non_finite_floats_are_refused_from_set_and_file(tmp_path, setting):
    key, value = setting.split("=")
    with pytest.raises(UserError) as e:
        parse(["--set", setting])
    assert f"config key '{key}'" in str(e.value) and "is not a finite number (from --set)" in str(e.value)
    if value == "inf":  # in a file, YAML reads it as the string 'inf': a wrong type, refused before this issue
        return
    *sections, last = key.split(".")
    f = tmp_path / "f.yaml"
    f.write_text("".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
                 + f"{'  ' * len(sections)}{last}: {value}\n")
    with pytest.raises(UserError) as e:
        parse(["--config", str(f)])
    assert f"config key '{key}'" in str(e.value) and f"is not a finite number (in {f})" in str(e.value)


def test_name_is_the_text_given_and_not_blank(tmp_path):
    assert parse(["--set", "name=123"]).name == "123"
    assert parse(["--set", "name=1e3"]).name == "1e3"
    assert parse(["--set", "name=007"]).name == "007"
    f = tmp_path / "cfg.yaml"
    f.write_text("name: 2024\noptim: {lr: 1.0}\n")
    assert parse(["--config", str(f)]).name == "2024"
    for blank in ("name=", "name= ", "name=   "):
        with pytest.raises(UserError) as e:
            parse(["--config", str(f), "--set", blank])
        assert "is empty" in str(e.value) and "\n" not in str(e.value)


def test_in_range_integers_and_distinct_flags():
    assert config.in_range([0, 3], "x >= 0, integers, distinct") and config.in_range([], "x >= 0, integers, distinct")
    for bad in ([1.5], [True], ["a"], [-1], [0, 0], [[1]]):
        assert not config.in_range(bad, "x >= 0, integers, distinct"), bad
    assert config.in_range([0.5, 0.5], "x >= 0") and not config.in_range([0.5, 0.5], "x >= 0, distinct")
