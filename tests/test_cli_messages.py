"""What the operator CLI prints when something is off: the cause and the fix, verbatim."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cloud_hub.cli import app as hub_cli


def test_a_state_dir_without_the_operator_token_is_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(hub_cli, ["models", "list", "--state-dir", str(tmp_path / "typo")],
                                env={"EDGEFED_HUB_TOKEN": ""})  # fmt: skip
    assert result.exit_code == 2
    assert f"no operator token: {tmp_path / 'typo' / 'operator.token'} does not exist" in result.output


def test_brackets_in_messages_are_printed_not_read_as_markup(tmp_path: Path) -> None:
    result = CliRunner().invoke(hub_cli, ["deploy", "model[tensorrt]", "--to", "device:x", "--token", "t"])
    assert result.exit_code == 2 and "'model[tensorrt]': write the model as NAME@VERSION" in result.output
