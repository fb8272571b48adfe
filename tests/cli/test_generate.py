"""`imgbatch generate` and `imgbatch.generate`: one request at a time, as the seed skill does.

Takes: the fake DashScope server (real-sized images where a test says so) and the CLI through
click's runner.
Gives: evidence that a single request is validated like a manifest shot (nothing sent when it is
wrong), written where the skill writes it, answered with the normalized response, served from
the cache the second time (and from an apply's cache), and exits like `apply`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image

import imgbatch
from imgbatch.cli.main import main
from imgbatch.errors import ManifestError, ProviderError
from imgbatch.shots.request import ImageRequest, simplified
from tests.support.fake_dashscope import FakeDashScope
from tests.support.files import write_manifest

REQUEST = {
    "prompt": "a studio product photo of headphones on a walnut desk",
    "negative_prompt": "blurry, watermark",
    "size": "1328*1328",
    "seed": 1234,
}


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)


def response_of(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, "stdout is the response and nothing else"
    document: dict[str, Any] = json.loads(lines[0])
    return document


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.real_images
def test_generate_writes_the_skill_folder_and_prints_the_normalized_response(
    api_env: dict[str, str], fake_server: FakeDashScope, in_tmp: Path
) -> None:
    result = run("generate", "--request", json.dumps(REQUEST), "--print-response")
    response = response_of(result)
    assert set(response) == {
        "image_url", "width", "height", "seed", "file", "request_id", "cached"
    }  # fmt: skip
    assert (response["width"], response["height"], response["seed"]) == (1328, 1328, 1234)
    assert response["cached"] is False
    assert response["image_url"].startswith(fake_server.image_base_url)
    assert isinstance(response["request_id"], str) and len(response["request_id"]) == 36
    file = Path(response["file"])
    assert file.parent == (in_tmp / "output" / "ai-image-qwen-image" / "images").resolve()
    with Image.open(file) as image:
        image.load()
        assert image.size == (1328, 1328)
    assert file.stat().st_size > 1_000_000  # a real-sized image, whole
    # What was sent is the normalized request, mapped as the skill maps it.
    (sent,) = [r for r in fake_server.requests]
    assert sent.body["parameters"]["seed"] == 1234
    assert sent.body["parameters"]["negative_prompt"] == "blurry, watermark"
    assert sent.body["input"]["messages"][0]["content"][-1] == {"text": REQUEST["prompt"]}
    assert "generated" in result.stderr


def test_the_same_request_again_sends_nothing(
    api_env: dict[str, str], fake_server: FakeDashScope, in_tmp: Path
) -> None:
    first = response_of(run("generate", "--request", json.dumps(REQUEST), "--print-response"))
    again = response_of(run("generate", "--request", json.dumps(REQUEST), "--print-response"))
    assert fake_server.generation_count == 1
    assert again["cached"] is True
    assert again["file"] == first["file"]
    assert again["request_id"] is None


def test_request_from_a_file_and_from_stdin_and_an_explicit_output(
    api_env: dict[str, str], fake_server: FakeDashScope, in_tmp: Path
) -> None:
    (in_tmp / "req.json").write_text(json.dumps(REQUEST), encoding="utf-8")
    target = in_tmp / "shots" / "headphones.png"
    response = response_of(
        run("generate", "--request", "@req.json", "--output", str(target), "--print-response")
    )
    assert Path(response["file"]) == target.resolve()
    assert target.is_file()
    piped = response_of(
        run("generate", "--request", "-", "--print-response", stdin=json.dumps(REQUEST))
    )
    assert piped["cached"] is True  # same request: the default cache already has it
    assert fake_server.generation_count == 1


def test_a_request_an_apply_already_paid_for_is_free(
    api_env: dict[str, str], fake_server: FakeDashScope, in_tmp: Path
) -> None:
    manifest = write_manifest(
        in_tmp,
        "version: 1\nname: spot\nshots:\n  - id: s01\n"
        f"    prompt: {REQUEST['prompt']}\n    negative_prompt: {REQUEST['negative_prompt']}\n"
        f'    size: "{REQUEST["size"]}"\n    seed: {REQUEST["seed"]}\n',
    )
    assert run("apply", str(manifest)).exit_code == 0
    assert fake_server.generation_count == 1
    target = in_tmp / "output" / "spot" / "keyframes" / "s01-again.png"
    response = response_of(
        run(
            "generate",
            "--request",
            json.dumps(REQUEST),
            "--output",
            str(target),
            "--print-response",
        )
    )
    assert response["cached"] is True
    assert fake_server.generation_count == 1
    assert target.read_bytes() == (in_tmp / "output" / "spot" / "s01.png").read_bytes()


@pytest.mark.parametrize(
    ("request_text", "message"),
    [
        ('{"prompt": "x", "sed": 3}', "field sed: unknown field 'sed'; did you mean 'seed'?"),
        (
            '{"prompt": "x", "size": "1024*1024"}',
            "field size: size '1024*1024' is not supported by qwen-image-max",
        ),
        ('{"prompt": "x", "model": "qwen-image-maxx"}', "did you mean 'qwen-image-max'?"),
        ('{"size": "1328*1328"}', "missing required field 'prompt'"),
        ("{not json", "--request is not valid JSON"),
        ('["a list"]', "the request must be a JSON object"),
        ("@missing.json", "cannot read the request file missing.json"),
    ],
)
def test_an_invalid_request_exits_2_names_the_field_and_sends_nothing(
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    in_tmp: Path,
    request_text: str,
    message: str,
) -> None:
    result = run("generate", "--request", request_text, "--print-response")
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stdout == ""
    assert fake_server.requests == []
    assert not (in_tmp / "output").exists()


@pytest.mark.parametrize("output", [None, "elsewhere/headphones.png"], ids=["default", "--output"])
def test_a_call_without_a_key_exits_2_and_writes_nothing(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, output: str | None
) -> None:
    """Refused before anything is sent, it leaves no folder behind: not the image's, and not
    the default folder's lock in the current directory (where the cache would have been)."""
    monkeypatch.setenv("HOME", str(in_tmp / "home"))
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    where = ("--output", output) if output else ()
    result = run("generate", "--request", json.dumps(REQUEST), "--provider", "dashscope", *where)
    assert result.exit_code == 2, result.output
    assert "No DashScope API key" in result.stderr
    assert sorted(path.name for path in in_tmp.iterdir()) == []


def test_a_cached_request_needs_no_key(
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    in_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The key is checked early only when a request must be sent: the cache serves without."""
    target = in_tmp / "elsewhere" / "headphones.png"
    first = run("generate", "--request", json.dumps(REQUEST), "--output", str(target))
    assert first.exit_code == 0, first.output
    monkeypatch.delenv("DASHSCOPE_API_KEY")
    again = run(
        "generate", "--request", json.dumps(REQUEST), "--provider", "dashscope",
        "--output", str(target), "--print-response",
    )  # fmt: skip
    assert response_of(again)["cached"] is True
    assert fake_server.generation_count == 1
    # Outside any apply folder, the cache is the default folder's, as documented.
    assert (in_tmp / "output" / "ai-image-qwen-image" / ".imgbatch" / "cache").is_dir()


def test_a_refused_request_exits_1_with_the_service_message(
    api_env: dict[str, str], fake_server: FakeDashScope, in_tmp: Path
) -> None:
    request = {**REQUEST, "prompt": "a FORBIDDEN thing"}
    result = run("generate", "--request", json.dumps(request), "--print-response")
    assert result.exit_code == 1
    assert "DataInspectionFailed" in result.stderr
    assert result.stdout == ""


def test_the_python_api_takes_and_gives_the_same_shapes(
    api_env: dict[str, str], fake_server: FakeDashScope, in_tmp: Path
) -> None:
    response = imgbatch.generate(REQUEST, provider="dashscope")
    assert response["cached"] is False
    assert Path(response["file"]).is_file()
    assert imgbatch.generate(REQUEST)["cached"] is True
    offline = imgbatch.generate(REQUEST, provider="placeholder", output=in_tmp / "p.png")
    assert offline["cached"] is False  # another provider is another request
    assert offline["image_url"] == (in_tmp / "p.png").resolve().as_uri()
    with pytest.raises(ManifestError, match="unknown field 'sed'"):
        imgbatch.generate({"prompt": "x", "sed": 1})
    with pytest.raises(ProviderError, match="DataInspectionFailed"):
        imgbatch.generate({**REQUEST, "prompt": "FORBIDDEN"})
    assert fake_server.generation_count == 2


def test_a_reference_image_goes_before_the_text_and_is_keyed_by_content(
    api_env: dict[str, str], fake_server: FakeDashScope, in_tmp: Path
) -> None:
    Image.new("RGB", (400, 400), (200, 30, 30)).save(in_tmp / "ref.png")
    request = {**REQUEST, "reference_image": "ref.png"}
    first = response_of(run("generate", "--request", json.dumps(request), "--print-response"))
    (sent,) = fake_server.requests
    content = sent.body["input"]["messages"][0]["content"]
    assert [list(item) for item in content] == [["image"], ["text"]]
    assert content[0]["image"].startswith("data:image/png;base64,")
    # Renamed, same bytes: the same request, nothing sent.
    (in_tmp / "ref.png").rename(in_tmp / "moved.png")
    moved = {**REQUEST, "reference_image": "moved.png"}
    again = response_of(run("generate", "--request", json.dumps(moved), "--print-response"))
    assert again["cached"] is True and again["file"] == first["file"]
    assert fake_server.generation_count == 1


def test_a_data_uri_reference_is_sent_as_its_checked_image_and_keyed_like_the_file(
    api_env: dict[str, str], fake_server: FakeDashScope, in_tmp: Path
) -> None:
    """Issue 9: `reference_image` as a `data:` URI in `--request` and in YAML."""
    Image.new("RGB", (400, 400), (30, 200, 30)).save(in_tmp / "ref.png")
    data = (in_tmp / "ref.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    request = {**REQUEST, "reference_image": uri}
    first = response_of(run("generate", "--request", json.dumps(request), "--print-response"))
    (sent,) = fake_server.requests
    image = sent.body["input"]["messages"][0]["content"][0]["image"]
    assert base64.b64decode(image.removeprefix("data:image/png;base64,")) == data
    # The same bytes as a file are the same request: nothing sent.
    by_path = {**REQUEST, "reference_image": "ref.png"}
    again = response_of(run("generate", "--request", json.dumps(by_path), "--print-response"))
    assert again["cached"] is True and again["file"] == first["file"]
    assert fake_server.generation_count == 1

    manifest = write_manifest(
        in_tmp,
        f"version: 1\nname: inline\nshots:\n  - id: a\n    prompt: x\n"
        f'    reference_image: "{uri}"\n  - id: b\n    prompt: x\n'
        f'    reference_image: "data:image/png;base64,{"A" * 400}"\n',
    )
    result = run("validate", str(manifest))
    assert result.exit_code == 2
    # Shot b's bytes are no image; the message names it and quotes the URI's head only.
    assert "shots.yaml:9:22: shot b, field reference_image: reference image 'data:image/png;" in (
        result.output
    )
    assert "(422 characters)' is not a readable image" in result.output
    assert "shot a" not in result.output


def test_apply_takes_a_parsed_manifest_and_a_provider_name(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    manifest = {
        "version": 1,
        "name": "from-python",
        "shots": [{"id": "a", "prompt": "a red bicycle", "size": "1328*1328"}],
    }
    report = imgbatch.apply(manifest, provider="placeholder")
    assert report.ok
    assert (in_tmp / "output" / "from-python" / "a.png").is_file()
    assert report.plan.provider == "placeholder"
    with pytest.raises(ManifestError, match="missing required field 'prompt'"):
        imgbatch.apply({"version": 1, "shots": [{"id": "b"}]}, provider="placeholder")


# ----- a 200 without an image: the seed's rule ----------------------------------------------------

STYLED = """\
version: 1
name: imageless
shots:
  - id: s01
    prompt: A lighthouse at night, long exposure. Waves crash below the cliff.
    style: oil painting
    size: "1328*1328"
"""


def test_a_200_without_an_image_is_asked_once_more_simplified_and_recorded(
    api_env: dict[str, str], fake_server: FakeDashScope, in_tmp: Path
) -> None:
    manifest = write_manifest(in_tmp, STYLED)
    fake_server.no_image_next()
    result = run("apply", str(manifest))
    assert result.exit_code == 0, result.output
    assert "s01: the service answered without an image (request " in result.stderr
    first, second = (r.body["input"]["messages"][0]["content"][-1]["text"] for r in
                     fake_server.requests)  # fmt: skip
    assert (
        first
        == "A lighthouse at night, long exposure. Waves crash below the cliff.\nStyle: oil painting"
    )
    assert second == "A lighthouse at night, long exposure."
    document = json.loads((in_tmp / "output" / "imageless" / "results.json").read_text())
    (entry,) = document["shots"]
    assert entry["status"] == "generated"
    assert entry["simplified"] is True
    assert entry["prompt_sent"] == second
    assert "base64" not in json.dumps(document)
    # The shot is done: the next apply sends nothing.
    assert run("apply", str(manifest)).exit_code == 0
    assert fake_server.generation_count == 2


def test_no_image_twice_fails_with_both_request_ids_and_no_simplify_turns_it_off(
    api_env: dict[str, str], fake_server: FakeDashScope, in_tmp: Path
) -> None:
    manifest = write_manifest(in_tmp, STYLED)
    fake_server.no_image_next(times=2)
    result = run("apply", str(manifest))
    assert result.exit_code == 1
    (entry,) = json.loads((in_tmp / "output" / "imageless" / "results.json").read_text())["shots"]
    assert entry["status"] == "failed"
    assert "also when asked again with a simplified prompt" in entry["error"]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    assert re.search(rf"request {uuid}, {uuid}\)", entry["error"]), entry["error"]
    assert fake_server.generation_count == 2

    fake_server.reset()
    fake_server.no_image_next()
    result = run("apply", str(manifest), "--no-simplify")
    assert result.exit_code == 1
    assert fake_server.generation_count == 1


@pytest.mark.parametrize(
    ("prompt", "style", "expected"),
    [
        ("A lighthouse. Waves below.", None, "A lighthouse."),
        ("a lighthouse, waves below, night", None, "a lighthouse"),
        ("一座灯塔。海浪拍岸。", None, "一座灯塔。"),
        ("a lighthouse", "oil painting", "a lighthouse"),
        ("a lighthouse", None, None),  # nothing left to simplify
    ],
)
def test_simplified_drops_the_style_and_keeps_the_first_sentence(
    prompt: str, style: str | None, expected: str | None
) -> None:
    request = ImageRequest(prompt, style=style)
    simpler = simplified(request)
    if expected is None:
        assert simpler is None
    else:
        assert simpler is not None
        assert (simpler.text, simpler.style) == (expected, None)


def test_every_type_a_caller_receives_or_catches_is_exported() -> None:
    import imgbatch.errors as errors
    from imgbatch.plan.decide import Action, Plan, PlannedShot
    from imgbatch.state.results import ResultEntry

    assert sorted(imgbatch.__all__) == sorted(imgbatch._EXPORTS)
    for name in imgbatch.__all__:
        assert getattr(imgbatch, name) is not None
    raised = {
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.ImgbatchError)
    }
    assert raised <= {getattr(imgbatch, name) for name in imgbatch.__all__}
    for received in (ResultEntry, Plan, PlannedShot, Action, errors.ManifestProblem):
        assert getattr(imgbatch, received.__name__) is received


def _device(folder: Path) -> str:
    """A character device like /dev/null, made in the test's folder: a test that failed must
    never have replaced the real one."""
    path = folder / "null"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD")
    return str(path)


def _fifo(folder: Path) -> str:
    path = folder / "pipe.png"
    os.mkfifo(path)
    return str(path)


def _users_png(path: Path) -> str:
    Image.new("RGB", (8, 8)).save(path, format="PNG")
    return str(path)


@pytest.mark.parametrize(
    ("target", "what"),
    [
        (_device, "not a regular file (a device or a pipe)"),
        (_fifo, "not a regular file (a device or a pipe)"),
        (lambda folder: _users_png(folder / "portrait.png"), "a file imgbatch did not write"),
    ],
    ids=["device", "fifo", "users-file"],
)
def test_generate_output_never_replaces_what_imgbatch_did_not_write(
    api_env: dict[str, str],
    fake_server: FakeDashScope,
    in_tmp: Path,
    target: Callable[[Path], str],
    what: str,
) -> None:
    path = target(in_tmp)
    before = Path(path).read_bytes() if Path(path).is_file() else None
    result = CliRunner().invoke(
        main, ["generate", "--request", json.dumps(REQUEST), "--output", path]
    )
    assert result.exit_code == 2, result.output
    assert f"output {Path(path).resolve()} is {what}, so it is not replaced" in result.output
    assert "remove it or choose another path; nothing was sent" in result.output
    assert fake_server.generation_count == 0
    if before is not None:
        assert Path(path).read_bytes() == before


def test_generate_output_replaces_an_image_it_wrote(
    api_env: dict[str, str], fake_server: FakeDashScope, in_tmp: Path
) -> None:
    target = str(in_tmp / "take.png")
    response_of(
        run("generate", "--request", json.dumps(REQUEST), "--output", target, "--print-response")
    )
    other = {**REQUEST, "seed": 99}
    response = response_of(
        run("generate", "--request", json.dumps(other), "--output", target, "--print-response")
    )
    assert response["seed"] == 99 and fake_server.generation_count == 2
