"""Presets, command-line overrides, typing and the one-line errors of config.py."""

import itertools
import json
import shlex
import subprocess
import sys

import pytest

from config import DEFAULTS, PRESETS, Config, ConfigError, config_from_json, load_config, parse_args
from tests.launch import ROOT


def test_default_is_the_synthetic_quick_start() -> None:
    cfg = parse_args([])
    assert cfg.preset == "synthetic" and cfg.data == "synthetic" and cfg.val_targets == ["synth_val"]
    assert cfg.val_at_start and cfg.run_name == "synthetic"
    assert set(cfg.to_dict()) == {"preset", *DEFAULTS}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_uses_known_keys(name: str) -> None:
    assert set(PRESETS[name]) <= set(DEFAULTS)
    cfg = load_config(name)
    assert cfg.run_name == name


def test_arcface_torch_recipes() -> None:
    r100 = load_config("ms1mv3_r100")
    assert (r100.network, r100.num_classes, r100.num_image) == ("r100", 93431, 5179510)
    assert (r100.lr, r100.num_epoch) == (0.1, 20)
    glint = load_config("glint360k_r100")
    assert (glint.loss, glint.margin_m2, glint.margin_m3, glint.num_classes) == ("cosface", 0.0, 0.4, 360232)
    ms1mv2 = load_config("ms1mv2_r50")
    assert (ms1mv2.weight_decay, ms1mv2.num_classes, ms1mv2.fp16, ms1mv2.val_targets) == (
        5e-4, 85742, True, ["lfw", "cfp_fp", "agedb_30"])
    assert load_config("ms1mv3_mbf").num_epoch == 40


# What a preset may set without a column in docs/training.md's table: where the data is and how the run reports,
# not the recipe.
_RUN_KEYS = {"data", "val_every", "log_every", "save_every", "val_at_start", "num_workers", "recompute",
             "synthetic_identities", "synthetic_images_per_id", "synthetic_val_pairs"}


def _presets_table() -> tuple[list[str], dict[str, dict[str, str]]]:
    """docs/training.md's presets table: its config keys, and per preset key -> cell text (command-line form).

    Columns after `preset` and `arcface_torch config` name one or more keys (`a` / `b`); a cell holds their values
    the same way, each a command-line word (`""` is the empty list).
    """
    section = (ROOT / "docs" / "training.md").read_text().split("\n## Presets\n", 1)[1]
    lines = itertools.takewhile(lambda line: line.startswith("|"),
                                itertools.dropwhile(lambda line: not line.startswith("|"), section.splitlines()))
    header, _, *rows = ([cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines)
    assert header[:2] == ["preset", "arcface_torch config"], header
    columns = [[key.strip().strip("`") for key in cell.split(" / ")] for cell in header[2:]]
    table = {}
    for row in rows:
        name = row[0].split()[0].strip("`")
        assert row[1], f"{name}: which arcface_torch config does it follow?"
        values: dict[str, str] = {}
        for keys, cell in zip(columns, row[2:], strict=True):
            parts = ["".join(shlex.split(part)) for part in cell.split(" / ")]
            assert len(parts) == len(keys), f"{name}: {cell!r} does not give {' / '.join(keys)}"
            values.update(zip(keys, parts, strict=True))
        table[name] = values
    return [key for keys in columns for key in keys], table


def test_presets_equal_the_table_in_docs_training() -> None:
    keys, table = _presets_table()
    assert set(keys) <= set(DEFAULTS), f"unknown keys in the table: {sorted(set(keys) - set(DEFAULTS))}"
    assert set(table) == set(PRESETS), (f"presets without a row: {sorted(set(PRESETS) - set(table))}; "
                                        f"rows without a preset: {sorted(set(table) - set(PRESETS))}")
    for name, cells in table.items():
        cfg, documented = load_config(name), load_config(name, cells)  # cells typed as on the command line
        drift = {key: (cells[key], cfg[key]) for key in keys if documented[key] != cfg[key]}
        assert not drift, f"docs/training.md row {name} (table, preset): {drift}"
        hidden = set(PRESETS[name]) - set(keys) - _RUN_KEYS
        assert not hidden, f"{name} sets {sorted(hidden)}, which the table does not show"

def test_overrides_are_typed_from_the_defaults() -> None:
    cfg = parse_args(["--config", "ms1mv3_r50", "--network", "r100", "--sample_rate", "0.2", "--batch_size", "64",
                      "--lr", "1", "--fp16", "false", "--data", "/x/y", "--val_targets", "lfw, agedb_30",
                      "--num_classes", "none", "--resume"])
    assert cfg.network == "r100" and cfg.sample_rate == 0.2 and cfg.batch_size == 64
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0 and cfg.fp16 is False and cfg.data == "/x/y"
    assert cfg.val_targets == ["lfw", "agedb_30"] and cfg.num_classes is None and cfg.resume == "latest"
    assert parse_args(["--resume", "work_dirs/a"]).resume == "work_dirs/a"
    assert parse_args(["--val_targets", ""]).val_targets == []


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch_size", "8.5"], "--batch_size: expected int"),
    (["--fp16", "maybe"], "--fp16: expected true or false"),
    (["--lr", "fast"], "--lr: expected float"),
    (["--network", "r42"], "--network: 'r42' is not one of"),
    (["--sample_rate", "0"], "--sample_rate: must be in (0, 1]"),
    (["--batch_size", "0"], "--batch_size: must be > 0"),
    (["--seed", "none"], "--seed: cannot be none"),
    (["--warmup_epoch", "4", "--num_epoch", "4"], "--warmup_epoch: must be < num_epoch"),
    (["--resume", "--init_backbone", "x.pdparams"], "--init_backbone: starts a new run"),
    (["--nope", "1"], "unrecognized arguments: --nope 1"),
    (["--net", "r50"], "unrecognized arguments: --net"),  # no silent abbreviations
    (["--config", "ms1mv9"], "--config: unknown preset 'ms1mv9'"),
])
def test_bad_command_lines_fail_with_one_line_naming_the_key(argv: list[str], message: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_attribute_access_and_unknown_keys() -> None:
    cfg = load_config()
    cfg.lr = 0.5
    assert cfg.lr == 0.5 and cfg["lr"] == 0.5
    with pytest.raises(ConfigError, match="'bogus'"):
        cfg.bogus = 1
    with pytest.raises(AttributeError, match="bogus"):
        _ = cfg.bogus
    with pytest.raises(ConfigError, match="--batch_size"):
        cfg.replace(batch_size=-1)
    assert cfg.replace(batch_size="16").batch_size == 16


def test_json_round_trip(tmp_path) -> None:
    cfg = parse_args(["--config", "glint360k_r100", "--sample_rate", "0.1"])
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    back = config_from_json(path)
    assert back == cfg and back.preset == "glint360k_r100"
    path.write_text(json.dumps({**cfg.to_dict(), "lr_x": 1}))
    with pytest.raises(ConfigError, match="lr_x"):
        config_from_json(path)
    assert isinstance(load_config(), Config)


def test_cli_entry_point_exit_code() -> None:
    proc = subprocess.run([sys.executable, "config.py", "--width", "wide"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "config.py: error: --width: expected float, got 'wide'"
