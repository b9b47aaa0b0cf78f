"""The CLI is a thin shell: check the wiring and the error paths in-process."""

from __future__ import annotations

import pytest
import torch
from helpers import generated_reply
from openai_stub import OpenAIStub, text_response
from typer.testing import CliRunner

from steerlib.cli import app
from steerlib.traits.library import Trait

runner = CliRunner()


def test_traits_list_and_show():
    result = runner.invoke(app, ["traits", "list"])
    assert result.exit_code == 0
    assert "optimistic" in result.output and "sycophantic" in result.output
    shown = runner.invoke(app, ["traits", "show", "humorous"])
    assert '"name": "humorous"' in shown.output


def test_traits_new_against_endpoint(tmp_path):
    with OpenAIStub(lambda req: text_response(generated_reply())) as stub:
        out = tmp_path / "sarcastic.json"
        result = runner.invoke(app, ["traits", "new", "sarcastic", "--description", "Mocking irony.",
                                     "--base-url", stub.base_url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Trait.load(out).name == "sarcastic"


def test_steer_prints_steered_next_to_unsteered(tmp_path, embedded):
    torch.manual_seed(0)
    path = tmp_path / "v.pt"
    torch.save(torch.randn(576), path)
    result = runner.invoke(app, ["steer", "--vector", str(path), "--layer", "12", "--coef", "4",
                                 "--prompt", "Say hi.", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "--- unsteered" in result.output and "--- add coef=4 layer=12" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "99"], "out of range"),
        (["--layer", "12", "--mode", "sideways"], "unknown steering mode"),
    ],
)
def test_steer_bad_input(tmp_path, args, message):
    path = tmp_path / "v.pt"
    torch.save(torch.randn(576), path)
    result = runner.invoke(app, ["steer", "--vector", str(path), "--prompt", "x", *args])
    assert result.exit_code != 0
    assert message in str(result.exception)


def test_unknown_trait():
    result = runner.invoke(app, ["extract", "--trait", "grumpy-cat"])
    assert result.exit_code != 0
    assert "unknown trait 'grumpy-cat'" in str(result.exception)
