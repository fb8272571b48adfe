"""The API key never leaves the Authorization header of API calls, end to end.

Takes: `imgbatch` run as real subprocesses against the fake DashScope server, with a distinctive
key, through the paths where a key could slip out: a 400 whose message echoes the key, a
moderation 400, a run stopped by a 401, a key read from the credentials file, and a crash (an
unexpected error writes a log with a traceback).
Gives: proof that the key is in none of stdout, stderr, results.json, the journal, any file under
the output folders, the crash logs, or the committed cassettes; and that image downloads went to
the image host (`localhost`, not the API's 127.0.0.1) without an Authorization header.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from imgbatch.cli.main import error_boundary
from tests.support.fake_dashscope import GENERATION_PATH, FakeDashScope
from tests.support.files import write_manifest

SECRET = "sk-SECRET-7f3a9c21e5b84d06aa5e0c9d1b2f4e68"
CASSETTES = Path(__file__).resolve().parent / "cassettes"
COMMAND = [sys.executable, "-c", "from imgbatch.cli.main import main; main()"]
# An unexpected error once the shots are done: writing results.json hits a bug.
CRASHING_COMMAND = [
    sys.executable,
    "-c",
    "import imgbatch.state.folder\n"
    "def bug(*args, **kwargs): raise RuntimeError('a bug while writing results.json')\n"
    "imgbatch.state.folder.OutputFolder.save = bug\n"
    "from imgbatch.cli.main import main; main()",
]

MANIFEST_A = """\
version: 1
name: leaky-a
limits:
  rps: 500
shots:
  - id: a1-echo
    prompt: the server echoes the key back in its error message
    size: "1328*1328"
  - id: a2-moderated
    prompt: a FORBIDDEN thing
    size: "1328*1328"
  - id: a3-fine
    prompt: a plain red bicycle
    size: "1328*1328"
    seed: 11
"""

MANIFEST_B = """\
version: 1
name: leaky-b
limits:
  rps: 500
  concurrency: 1
shots:
  - id: b1
    prompt: a green bicycle
    size: "928*1664"
  - id: b2
    prompt: a yellow bicycle
    size: "928*1664"
"""

MANIFEST_C = """\
version: 1
name: leaky-c
limits:
  rps: 500
shots:
  - id: c1
    prompt: a bicycle whose results file is never written
    size: "1328*1328"
"""


class Runner:
    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self.transcript: list[str] = []

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, command: list[str] = COMMAND
    ) -> int:
        completed = subprocess.run(
            [*command, *args],
            cwd=self.cwd,
            env=env if env is not None else self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.transcript += [completed.stdout, completed.stderr]
        return completed.returncode


@pytest.mark.slow  # every command, as processes
def test_the_key_appears_nowhere(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    crash_dir = tmp_path / "tmp"  # TMPDIR of the runs: where crash logs go
    crash_dir.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    manifest_a = write_manifest(work, MANIFEST_A, "a.yaml")
    manifest_b = write_manifest(work, MANIFEST_B, "b.yaml")
    manifest_c = write_manifest(work, MANIFEST_C, "c.yaml")
    base_env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("DASHSCOPE_") and name != "OUTPUT_DIR"
    }

    with FakeDashScope(api_key=SECRET) as server:
        env = {
            **base_env,
            "HOME": str(home),
            "TMPDIR": str(crash_dir),
            "DASHSCOPE_API_KEY": SECRET,
            "DASHSCOPE_HTTP_BASE_URL": server.base_url,
        }
        run = Runner(work, env)
        assert run("validate", "a.yaml") == 0
        assert run("plan", "a.yaml") == 0

        # A 400 whose message quotes the key (imgbatch must redact it), and a moderation 400.
        server.enqueue_error(400, "InvalidParameter", f"Header Bearer {SECRET} is malformed.")
        assert run("apply", "a.yaml", "--concurrency", "1") == 1
        assert run("apply", "a.yaml") == 1  # the moderated shot fails again; the echo one passes

        # A run stopped by a 401, with the key read from the credentials file this time.
        (home / ".alibabacloud").mkdir()
        (home / ".alibabacloud" / "credentials").write_text(
            f"[default]\ndashscope_api_key = {SECRET}\n", encoding="utf-8"
        )
        file_env = {name: value for name, value in env.items() if name != "DASHSCOPE_API_KEY"}
        server.enqueue_error(401, "InvalidApiKey", "Invalid API-key provided.")
        assert run("apply", "b.yaml", env=file_env) == 1
        assert run("apply", "b.yaml") == 0

        # An unexpected error after the shots are done, before results.json is written.
        assert run("apply", "c.yaml", command=CRASHING_COMMAND) == 1

    output = "\n".join(run.transcript)
    # The runs did what they were meant to, so the checks below cover real paths.
    assert "***" in output  # the echoed key, redacted
    assert "DataInspectionFailed" in output
    assert "Stopped: the service refused the credentials" in output
    assert ".alibabacloud/credentials" in output  # the 401 names the file the key came from
    crash_logs = re.findall(r"details in (\S+)", output)
    assert crash_logs, "the crashing run should have produced a crash log"
    assert all(Path(log).is_relative_to(crash_dir) for log in crash_logs)
    assert {r.headers.get("authorization") for r in server.requests} == {f"Bearer {SECRET}"}
    assert all(r.path == GENERATION_PATH for r in server.requests)
    assert server.successes >= 5

    assert SECRET not in output
    output_files = [p for p in (work / "output").rglob("*") if p.is_file()]
    names = {p.name for p in output_files}
    assert {"results.json", "a3-fine.png", "b1.png", "c1.png"} <= names
    for path in [
        *output_files,
        *(p for p in crash_dir.rglob("*") if p.is_file()),
        *(p for p in CASSETTES.rglob("*") if p.is_file()),
        manifest_a,
        manifest_b,
        manifest_c,
    ]:
        assert SECRET.encode() not in path.read_bytes(), path
    # The journal of the crashed run survives (results were never written): also clean.
    journal = work / "output" / "leaky-c" / ".imgbatch" / "journal.jsonl"
    assert journal.is_file() and "c1" in journal.read_text(encoding="utf-8")

    assert server.downloads, "images were downloaded"
    for download in server.downloads:
        assert "authorization" not in download.headers
        assert download.headers["host"].split(":")[0] == "localhost"
        assert download.status == 200


def test_a_crash_log_redacts_a_key_from_the_credentials_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / ".alibabacloud").mkdir()
    (tmp_path / ".alibabacloud" / "credentials").write_text(
        f"[default]\ndashscope_api_key = {SECRET}\n", encoding="utf-8"
    )
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    @error_boundary
    def command() -> int:
        raise RuntimeError(f"a library bug that quotes the key {SECRET}")

    with pytest.raises(SystemExit) as exit_info:
        command()

    assert exit_info.value.code == 1
    (log,) = re.findall(r"details in (\S+)", capsys.readouterr().err)
    text = Path(log).read_text(encoding="utf-8")
    assert "RuntimeError: a library bug that quotes the key ***" in text
    assert SECRET not in text
