"""A shared store in an S3-compatible bucket (`s3://`) or Alibaba Cloud OSS (`oss://`).

Takes the bucket, the prefix and the environment; gives `ObjectStore`'s operations through
aiobotocore (imported here only, so only a run with a store pays for it). Endpoint, region and
credentials come from the standard AWS variables and files (`AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_PROFILE`), as every S3 tool reads them.

`create` is `PutObject` with `If-None-Match: *` on S3; OSS answers that header with
NotImplemented, so there it is `x-oss-forbid-overwrite: true`, and `replace` cannot be
conditional (OSS has no `If-Match` on writes): `if_match` is False. The service's refusals are
translated in one table (`_refusal`); anything else it answers is a `SharedStoreError` naming
the operation and the object's URL, never a credential.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import ipaddress
import time
from collections import Counter
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiobotocore.session
import botocore.exceptions
from aiobotocore.config import AioConfig

from imgbatch.errors import SharedStoreError
from imgbatch.state.store.objects import MAX_OBJECT_BYTES, Conflict, Exists, Listed, Stored

# Set while an OSS create is being sent: the request gets `x-oss-forbid-overwrite`.
_CREATING: contextvars.ContextVar[bool] = contextvars.ContextVar("creating", default=False)
_TAKEN = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "FileAlreadyExists"})


class BucketStore:
    """`ObjectStore` over `scheme://bucket/prefix`; open with `await store.open()`."""

    def __init__(self, scheme: str, bucket: str, prefix: str, environ: Mapping[str, str]) -> None:
        self.scheme = scheme
        self.oss = scheme == "oss"
        self.if_match = not self.oss
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"{scheme}://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.requests: Counter[str] = Counter()
        self._environ = environ
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def open(self) -> BucketStore:
        """Make the client, inside the running event loop (aiohttp's session belongs to it)."""
        env = self._environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        if self.oss and endpoint is None:
            raise SharedStoreError(
                f"{self.url}: set AWS_ENDPOINT_URL to the OSS endpoint of the bucket's region "
                "(https://oss-<region>.aliyuncs.com) and AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY to an AccessKey pair"
            )
        session = _session(env.get("AWS_PROFILE") or None)
        keys = {
            "aws_access_key_id": env.get("AWS_ACCESS_KEY_ID"),
            "aws_secret_access_key": env.get("AWS_SECRET_ACCESS_KEY"),
            "aws_session_token": env.get("AWS_SESSION_TOKEN"),
        }
        config = AioConfig(
            s3={"addressing_style": _addressing(endpoint, self.oss)},
            # Also for presigned URLs (the contact sheet's), which botocore would otherwise
            # sign with the deprecated SigV2 for some endpoints.
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": 4},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=64,
        )
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=endpoint,
                region_name=region or ("us-east-1" if endpoint else None),
                config=config,
                **{name: value for name, value in keys.items() if value},
            )
        )
        if self.oss:
            self._client.meta.events.register("before-sign.s3.PutObject", _forbid_overwrite)
        return self

    async def close(self) -> None:
        await self._stack.aclose()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def object_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    async def get(self, name: str) -> Stored | None:
        self.requests["get"] += 1
        try:
            answer = await self._client.get_object(Bucket=self.bucket, Key=self._key(name))
            async with answer["Body"] as body:
                if answer.get("ContentLength", 0) > MAX_OBJECT_BYTES:
                    raise SharedStoreError(f"{self.object_url(name)} is too large to be imgbatch's")
                data = await body.read()
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._failed("read", name, exc) from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._failed("read", name, exc) from None
        return Stored(data, answer["ETag"], _age(answer))

    async def create(self, name: str, data: bytes) -> str:
        self.requests["put"] += 1
        condition = {} if self.oss else {"IfNoneMatch": "*"}
        token = _CREATING.set(True)
        try:
            return await self._put(name, data, condition, Exists)
        finally:
            _CREATING.reset(token)

    async def replace(self, name: str, data: bytes, etag: str) -> str:
        self.requests["put"] += 1
        condition = {"IfMatch": etag} if self.if_match else {}
        return await self._put(name, data, condition, Conflict)

    async def _put(
        self, name: str, data: bytes, condition: dict[str, str], refused: type[Exception]
    ) -> str:
        try:
            answer = await self._client.put_object(
                Bucket=self.bucket, Key=self._key(name), Body=data, **condition
            )
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _TAKEN or _status(exc) in (409, 412):
                raise refused(name) from None
            if refused is Conflict and _code(exc) in ("NoSuchKey", "404"):
                raise Conflict(name) from None
            if refused is Exists and _code(exc) == "NotImplemented":
                raise SharedStoreError(
                    f"{self.url} answered a create-only write (If-None-Match: *) with "
                    f"{_status(exc)} NotImplemented; for Alibaba Cloud OSS use oss://"
                    f"{self.bucket}/{self.prefix}"
                ) from None
            raise self._failed("write", name, exc) from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._failed("write", name, exc) from None
        return str(answer["ETag"])

    async def exists(self, name: str) -> bool:
        self.requests["head"] += 1
        try:
            await self._client.head_object(Bucket=self.bucket, Key=self._key(name))
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._failed("read", name, exc) from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._failed("read", name, exc) from None
        return True

    async def delete(self, name: str) -> None:
        self.requests["delete"] += 1
        try:
            await self._client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._failed("delete", name, exc) from None

    async def names(self, prefix: str) -> list[str]:
        found: list[str] = []
        start = self._key(prefix)
        token: dict[str, str] = {}
        try:
            while True:
                self.requests["list"] += 1
                page = await self._client.list_objects_v2(Bucket=self.bucket, Prefix=start, **token)
                strip = len(self.prefix) + 1 if self.prefix else 0
                found += [item["Key"][strip:] for item in page.get("Contents", [])]
                if not page.get("IsTruncated"):
                    return sorted(found)
                token = {"ContinuationToken": page["NextContinuationToken"]}
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._failed("list", prefix, exc) from None

    async def listing(self, prefix: str) -> list[Listed]:
        found: list[Listed] = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        token: dict[str, str] = {}
        try:
            while True:
                self.requests["list"] += 1
                page = await self._client.list_objects_v2(
                    Bucket=self.bucket, Prefix=self._key(prefix), **token
                )
                now = _now(page)
                found += [
                    Listed(item["Key"][strip:], int(item.get("Size", 0)), _listed_age(item, now))
                    for item in page.get("Contents", [])
                ]
                if not page.get("IsTruncated"):
                    return sorted(found, key=lambda item: item.name)
                token = {"ContinuationToken": page["NextContinuationToken"]}
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._failed("list", prefix, exc) from None

    async def signed_url(self, name: str, expires: int) -> str | None:
        try:
            url: str = await self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(name)},
                ExpiresIn=expires,
            )
        except botocore.exceptions.BotoCoreError as exc:
            # No credentials, above all: signing is local, so this is the first a run that
            # asked the store nothing (a no-op apply, `imgbatch sheet`) hears of it.
            raise self._failed("sign a URL for", name, exc) from None
        return url

    def _failed(self, action: str, name: str, error: Exception) -> SharedStoreError:
        if isinstance(error, botocore.exceptions.ClientError):
            status = _status(error)
            said = f"{status} {_code(error)}: {error.response.get('Error', {}).get('Message', '')}"
        else:
            said = type(error).__name__ + (f": {error}" if str(error) else "")
        return SharedStoreError(f"cannot {action} {self.object_url(name)}: {said.strip()}")


@functools.cache
def _session(profile: str | None) -> Any:
    """One session per profile: each loads botocore's S3 model (a few hundred ms) once."""
    return aiobotocore.session.AioSession(profile=profile)


def _forbid_overwrite(request: Any, **_: Any) -> None:
    """OSS's create-only write: the header it honours instead of `If-None-Match`."""
    if _CREATING.get():
        request.headers["x-oss-forbid-overwrite"] = "true"


def _code(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: botocore.exceptions.ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _age(answer: Mapping[str, Any]) -> float:
    """Seconds since the object was written, by the store's clock (its Date header)."""
    modified = answer.get("LastModified")
    if modified is None:
        return 0.0
    return max(0.0, _now(answer) - float(modified.timestamp()))


def _listed_age(item: Mapping[str, Any], now: float) -> float:
    """A listed object's age (negative: dated ahead of the store's clock); 0 (as young as can
    be: nothing is collected for it) when the listing does not say when it was written."""
    modified = item.get("LastModified")
    return now - float(modified.timestamp()) if modified is not None else 0.0


def _now(answer: Mapping[str, Any]) -> float:
    """The store's time when it answered (its Date header), else this machine's."""
    headers = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    try:
        return parsedate_to_datetime(headers["date"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return time.time()


def _addressing(endpoint: str | None, oss: bool) -> str:
    """Path-style for a server on an address (a test server, MinIO on a LAN: no bucket
    subdomain resolves there); OSS needs virtual-hosted style elsewhere."""
    host = urlsplit(endpoint).hostname if endpoint else None
    if host == "localhost":
        return "path"
    if host is not None:
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(host)
            return "path"
    return "virtual" if oss else "auto"
