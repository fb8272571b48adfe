"""`imgbatch generate` never waits in silence: in a log, a line when its request is sent and one
when it is answered; on a terminal (tests/cli/test_terminal_width.py), a spinner; `-q`: neither.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgbatch.cli.main import main
from tests.support.fake_dashscope import FakeDashScope


def request(tmp_path: Path) -> str:
    # A prompt of its own: no cache anywhere has its image yet.
    return json.dumps({"prompt": f"a red bicycle {tmp_path.name}", "size": "1328*1328"})


@pytest.fixture
def slow_server(
    fake_server: FakeDashScope, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> FakeDashScope:
    monkeypatch.chdir(tmp_path)  # generate's cache folder is under the current one
    fake_server.latency = 0.6
    return fake_server


def test_a_log_gets_a_line_when_the_request_is_sent_and_when_it_is_answered(
    api_env: dict[str, str], slow_server: FakeDashScope, tmp_path: Path
) -> None:
    out = tmp_path / "bike.png"
    result = CliRunner().invoke(
        main, ["generate", "--request", request(tmp_path), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == "generate: request sent; waiting for the service's answer"
    # A small image may be whole before the line is written: then it is being written.
    pattern = r"generate: answered after 0\.[6-9] s; (downloading|writing) the image"
    assert re.fullmatch(pattern, lines[1])
    assert lines[-1] == f"{out} (generated)"
    assert slow_server.successes == 1


def test_quiet_says_only_where_the_image_went(
    api_env: dict[str, str], slow_server: FakeDashScope, tmp_path: Path
) -> None:
    out = tmp_path / "bike.png"
    for args in (["generate", "-q"], ["-q", "generate"]):
        out.unlink(missing_ok=True)
        result = CliRunner().invoke(
            main, [*args, "--request", request(tmp_path), "--output", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert result.stderr.splitlines() == [f"{out} (from the cache, nothing sent)"] or (
            result.stderr.splitlines() == [f"{out} (generated)"]
        )


def test_generate_help_speaks_of_a_request_not_a_shot_list() -> None:
    result = CliRunner().invoke(main, ["generate", "--help"])
    assert result.exit_code == 0
    text = result.output.lower()
    assert "manifest" not in text and "shot list" not in text
    assert "trust this request" in text
