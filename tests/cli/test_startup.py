"""A fast start, guarded by what is imported rather than by a clock.

Each check runs a command in a fresh interpreter and lists which heavy modules it loaded: `--help`
must load none of the library's run machinery (executor, aiohttp, Pillow, a provider's SDK, rich),
and neither `validate` nor `plan` of a valid manifest may import a provider's SDK, aiohttp or
jsonschema. What lets them skip the SDK is that the providers package answers `auto`, `metered`
and the secrets to redact without importing a provider; those answers are checked here too.
The timings are in bench/startup.py and bench/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import imgbatch
from imgbatch.providers import (
    PROVIDERS,
    create_provider,
    is_metered,
    resolve_provider_name,
    secrets_for_redaction,
)
from tests.support.files import FAKE_KEY

HEAVY = (
    "dashscope",
    "aiohttp",
    "PIL",
    "jinja2",
    "jsonschema",
    "rich",
    "imgbatch.run.executor",
    "imgbatch.run.apply",
)

# Runs the CLI in-process in a fresh interpreter, then prints which HEAVY modules got loaded.
PROBE = """
import json, sys
from imgbatch.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = {heavy!r}
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def loaded_after(*args: str, env: dict[str, str] | None = None) -> set[str]:
    code = PROBE.format(heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def keyless_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASHSCOPE_")}
    env["HOME"] = str(tmp_path)
    return env


def test_help_imports_none_of_the_run_machinery(tmp_path: Path) -> None:
    assert loaded_after("--help", env=keyless_env(tmp_path)) == set()
    assert loaded_after("apply", "--help", env=keyless_env(tmp_path)) == set()


def test_validate_and_plan_of_a_valid_manifest_import_no_sdk_nor_jsonschema(
    example_manifest: Path, tmp_path: Path
) -> None:
    env = keyless_env(tmp_path)
    env["DASHSCOPE_API_KEY"] = FAKE_KEY  # plan's provider is dashscope: it must still not load it
    # jsonschema only explains invalid manifests; the example is valid.
    validated = loaded_after("validate", str(example_manifest))
    assert {"dashscope", "aiohttp", "jsonschema"}.isdisjoint(validated)
    planned = loaded_after("plan", str(example_manifest), "--provider", "auto", env=env)
    assert "imgbatch.run.apply" in planned  # the probe does see the library being loaded
    assert {"dashscope", "aiohttp", "jsonschema"}.isdisjoint(planned)


def test_an_apply_loads_neither_jinja2_nor_pillow_before_its_first_request(
    example_manifest: Path, tmp_path: Path
) -> None:
    """The contact sheet is drawn after the last image and images are decoded as they come:
    apply's start (manifest, plan, provider) imports neither, and neither does `plan`. The
    example has no local reference image (checking one does need Pillow)."""
    env = keyless_env(tmp_path)
    env["DASHSCOPE_API_KEY"] = FAKE_KEY
    planned = loaded_after("plan", str(example_manifest), "--provider", "dashscope", env=env)
    assert "imgbatch.run.apply" in planned
    assert {"jinja2", "PIL"}.isdisjoint(planned)
    code = (
        "import sys; from imgbatch.run import apply; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert {"jinja2", "PIL"}.isdisjoint(json.loads(done.stdout.replace("'", '"')))


# The command as a process, with an exit handler and an object only the interpreter's
# teardown would finalise.
AS_A_PROCESS = """
import atexit, sys
atexit.register(lambda: print("exit handler ran", flush=True))
class Torn:
    def __del__(self):
        print("torn down", flush=True)
kept = Torn()
sys.argv = ["imgbatch", *sys.argv[1:]]
from imgbatch.cli.main import run
run()
"""


def test_the_command_ends_its_process_without_tearing_the_interpreter_down(
    tmp_path: Path,
) -> None:
    """Freeing every module after the work is done cost a seventh of a second of CPU after an
    apply's last image: the process ends once its output is flushed and its exit handlers ran,
    with the command's exit code (2 here: no such manifest)."""
    done = subprocess.run(
        [sys.executable, "-c", AS_A_PROCESS, "validate", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        env=keyless_env(tmp_path),
        timeout=60,
    )
    assert done.returncode == 2
    assert "no such file" in done.stderr
    assert done.stdout.splitlines() == ["exit handler ran"]


def test_import_imgbatch_is_cheap_and_its_exports_still_resolve() -> None:
    code = (
        f"import sys, imgbatch; print(sorted(m for m in {HEAVY!r} if m in sys.modules)); "
        "from imgbatch import apply, ApplyOptions, load_manifest, ConfigError; "
        "print(apply.__module__, ApplyOptions.__module__, load_manifest.__module__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.splitlines() == [
        "[]",
        "imgbatch.run.apply imgbatch.run.apply imgbatch.manifest.loader",
    ]


def test_every_lazy_export_resolves_and_unknown_names_raise() -> None:
    for name in imgbatch.__all__:
        assert getattr(imgbatch, name) is not None
    assert set(imgbatch.__all__) <= set(dir(imgbatch))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = imgbatch.nope  # type: ignore[attr-defined]


def test_the_providers_package_answers_auto_metered_and_secrets(tmp_path: Path) -> None:
    home = tmp_path / "home"
    credentials = home / ".alibabacloud" / "credentials"
    assert resolve_provider_name("auto", {}, home) == "placeholder"
    assert secrets_for_redaction({}, home) == ()
    assert resolve_provider_name("placeholder", {"DASHSCOPE_API_KEY": FAKE_KEY}, home) == (
        "placeholder"
    )
    assert resolve_provider_name("auto", {"DASHSCOPE_API_KEY": FAKE_KEY}, home) == "dashscope"
    assert secrets_for_redaction({"DASHSCOPE_API_KEY": FAKE_KEY}, home) == (FAKE_KEY,)
    credentials.parent.mkdir(parents=True)
    credentials.write_text("[default]\ndashscope_api_key = sk-from-file\n", encoding="utf-8")
    assert resolve_provider_name("auto", {}, home) == "dashscope"
    assert secrets_for_redaction({}, home) == ("sk-from-file",)
    credentials.write_text("not an ini file\n", encoding="utf-8")  # unreadable: no key, no crash
    assert resolve_provider_name("auto", {}, home) == "placeholder"
    assert secrets_for_redaction({}, home) == ()
    # A key no header can carry is not used, but it is still hidden wherever it is quoted.
    unsendable = {"DASHSCOPE_API_KEY": "sk-pasted with a space"}
    assert resolve_provider_name("auto", unsendable, home) == "placeholder"
    assert secrets_for_redaction(unsendable, home) == ("sk-pasted with a space",)


@pytest.mark.parametrize("name", PROVIDERS)
def test_is_metered_agrees_with_each_provider(name: str) -> None:
    provider = create_provider(name, {"DASHSCOPE_API_KEY": FAKE_KEY})
    assert provider.name == name
    assert provider.metered is is_metered(name)
    assert is_metered("some-future-provider")  # unknown: worded as paid, never as free
