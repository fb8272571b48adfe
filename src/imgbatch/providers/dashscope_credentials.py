"""DashScope's credentials: where its API key comes from, without importing the SDK.

Takes the environment (and optionally a home folder); gives an `ApiKey` (the secret and its
source) from `DASHSCOPE_API_KEY` or `dashscope_api_key` under `[default]` in
`~/.alibabacloud/credentials` (the environment wins). Kept apart from the provider so that
questions that only need the key (is one configured? what must a crash log hide?) cost
milliseconds, not the SDK's import.
"""

from __future__ import annotations

import configparser
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from imgbatch.errors import ConfigError

NO_KEY_MESSAGE = (
    "No DashScope API key: set DASHSCOPE_API_KEY, or add dashscope_api_key under [default] in "
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
    """The key from the environment, else from the Alibaba Cloud credentials file."""
    value = environ.get("DASHSCOPE_API_KEY", "").strip()
    if value:
        return ApiKey(value, "the DASHSCOPE_API_KEY environment variable")
    if home is None:
        home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    path = home / ".alibabacloud" / "credentials"
    if path.is_file():
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as exc:
            # The parser's own message can quote the file's lines, key included.
            raise ConfigError(f"{path} is not a valid INI file ({type(exc).__name__})") from None
        value = parser.get("default", "dashscope_api_key", fallback="").strip()
        if value:
            return ApiKey(value, f"dashscope_api_key under [default] in {path}")
    raise ConfigError(NO_KEY_MESSAGE)


def configured_key(environ: Mapping[str, str], home: Path | None = None) -> ApiKey | None:
    """The key, or None when none is configured or the credentials file cannot be read."""
    try:
        return resolve_api_key(environ, home)
    except ConfigError:
        return None
