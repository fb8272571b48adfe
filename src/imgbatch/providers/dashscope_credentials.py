"""DashScope's credentials: where its API key comes from, without importing the SDK.

Takes the environment (and optionally a home folder); gives an `ApiKey`: the secret and where
it came from (`resolve_api_key` lists the places, in order). Kept apart from the provider so that
questions that only need the key (is one configured? what must a crash log hide?) cost
milliseconds, not the SDK's import.
"""

from __future__ import annotations

import configparser
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from imgbatch.errors import ConfigError

NO_KEY_HINT = (
    "set DASHSCOPE_API_KEY, or add dashscope_api_key under [default] in "
    "~/.alibabacloud/credentials. To try a shot list without a key, use --provider placeholder."
)


@dataclass(frozen=True)
class ApiKey:
    """A secret and where it came from; printing it shows only the source."""

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"<API key from {self.source}>"


def resolve_api_key(environ: Mapping[str, str], home: Path | None = None) -> ApiKey:
    """The key from, in this order: `DASHSCOPE_API_KEY`; `dashscope_api_key` under `[default]`
    in `~/.alibabacloud/credentials` (the two places the seed skill names); then the SDK's own
    places, `DASHSCOPE_API_KEY_FILE_PATH` and `~/.dashscope/api_key`, so that a key the SDK
    would find is not silently passed over. Quotes around a value are not part of the key."""
    return _checked(_find_key(environ, home))


def _find_key(environ: Mapping[str, str], home: Path | None) -> ApiKey:
    if home is None:
        home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    looked: list[str] = []
    value = _unquoted(environ.get("DASHSCOPE_API_KEY", ""))
    looked.append("DASHSCOPE_API_KEY")
    if value:
        return ApiKey(value, "the DASHSCOPE_API_KEY environment variable")
    path = home / ".alibabacloud" / "credentials"
    looked.append(str(path))
    if path.is_file():
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as exc:
            # The parser's own message can quote the file's lines, key included.
            raise ConfigError(f"{path} is not a valid INI file ({type(exc).__name__})") from None
        value = _unquoted(parser.get("default", "dashscope_api_key", fallback=""))
        if value:
            return ApiKey(value, f"dashscope_api_key under [default] in {path}")
    key_files = [home / ".dashscope" / "api_key"]
    if environ.get("DASHSCOPE_API_KEY_FILE_PATH"):
        key_files.insert(0, Path(environ["DASHSCOPE_API_KEY_FILE_PATH"]))
    for key_file in key_files:
        looked.append(str(key_file))
        try:
            value = _unquoted(key_file.read_text(encoding="utf-8")) if key_file.is_file() else ""
        except (OSError, UnicodeDecodeError):
            value = ""
        if value:
            return ApiKey(value, f"the key file {key_file}")
    raise ConfigError(f"No DashScope API key (looked in {', '.join(looked)}): {NO_KEY_HINT}")


def _unquoted(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1].strip()
    return value


def _checked(key: ApiKey) -> ApiKey:
    """Refuse a key no HTTP header can carry, before any request: aiohttp would refuse each
    request on its own, and every shot would be retried as if the network had failed."""
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in key.value):
        raise ConfigError(
            f"the API key from {key.source} contains a space, line break or control character; "
            "copy the key again without them"
        )
    return key


def configured_key(environ: Mapping[str, str], home: Path | None = None) -> ApiKey | None:
    """The usable key, or None when none is configured, it cannot be read or cannot be sent."""
    try:
        return resolve_api_key(environ, home)
    except ConfigError:
        return None


def configured_secret(environ: Mapping[str, str], home: Path | None = None) -> str | None:
    """The key as configured, even one `resolve_api_key` refuses: text quoting it must hide it."""
    try:
        return _find_key(environ, home).value
    except ConfigError:
        return None
