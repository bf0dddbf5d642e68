import json

import pytest
from click.testing import CliRunner

from sppcli.cli import main

COMMANDS = sorted(main.commands)


def test_every_stage_command_exists():
    for name in ["make-dataset", "proposals", "import-proposals", "pretrain", "extract-features", "pool-windows",
                 "finetune-fc", "train-svm", "train-bbox-reg", "detect", "evaluate", "show", "classify", "status",
                 "report"]:
        assert name in COMMANDS


@pytest.mark.parametrize("name", COMMANDS)
def test_help_of_every_subcommand(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output or name in ("status", "report")
    assert "--cache-dir" in result.output


def test_top_level_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "pool-windows" in result.output


def test_unknown_set_key_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["status", "--cache-dir", str(tmp_path), "--set", "svm.nope=1"])
    assert result.exit_code == 1
    assert "unknown key svm.nope" in result.output and "known keys" in result.output


def test_missing_upstream_names_the_command(tmp_path, tiny_devkit):
    result = CliRunner().invoke(main, ["pool-windows", "--cache-dir", str(tmp_path), "--set",
                                       f"dataset.devkit={json.dumps(str(tiny_devkit))}", "--split", "test"])
    assert result.exit_code == 1
    assert "sppcli proposals --split test" in result.output
