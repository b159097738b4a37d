"""The S3 store: the store interface over one bucket prefix, at the keys of store/layout.py.

It is a `Backend` (store/backend.py) and keeps that interface's contracts; each handle
maps to its key (docs/remote.md). What S3 adds to them:

- `load` never returns a truncated body (a body cut off mid-way, or failing the checksum
  S3 stored with the object, is fetched again; CorruptError if it keeps failing). A
  response without a Content-Length is refused unread (RemoteError): every object has a
  bound, and nothing a bucket holds is read whole without one. An object without a stored
  checksum is not checked: callers check what they read.
- `load_range` fetches a body cut off again; a response that is not a range (a server
  ignoring Range) fails before its body is read, and more than `end - start` bytes are
  never read. S3 checks only a range that is the whole object against its stored
  checksum: callers hash-check every chunk they take from a range.
- Reads (`load`, `load_range`, `stat`) have a deadline, retries included
  (`read_timeout`): an endpoint that stops answering fails the read with RemoteError;
  cancelling the calling task cancels the request.
- `save` is one PutObject; `create` is a conditional one (`IfNoneMatch='*'`); `remove`
  deletes with DeleteObjects, 1,000 keys a request; `list` pages through
  ListObjectsV2, in key order.

Transient failures (5xx, SlowDown, connection resets, timeouts) are retried by botocore's
retry machinery; what is left is raised as RemoteError with one line that names the
bucket and never a credential.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import aiobotocore.httpxsession
import trio
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError

from snapstore.errors import CorruptError, NotFoundError, SnapstoreError, UsageError
from snapstore.store.backend import Handle, Kind, ObjectInfo, check_kind
from snapstore.store.layout import PREFIXES, key_of, name_of_key
from snapstore.store.url import DEFAULT_READ_TIMEOUT_S, MAX_READ_TIMEOUT_S, RemoteURL

T = TypeVar("T")

# botocore retries a failed request (5xx, throttling, resets before the body) this often.
MAX_ATTEMPTS = 6
# A body cut off after the headers is outside botocore's retry loop: fetch it again this often.
BODY_ATTEMPTS = 4
CONNECT_TIMEOUT_S = 5.0
# Per attempt: how long a response may keep the client waiting for its next bytes. A read
# as a whole, retries included, has the deadline of `read_timeout` (--read-timeout).
ATTEMPT_READ_TIMEOUT_S = 10.0
# DeleteObjects takes at most this many keys per request.
_DELETE_BATCH = 1000
# httpx sends a file body by iterating it; a plain BytesIO iterates by lines, which for
# binary data means a socket write and a loop turn every ~256 bytes (measured: 4 MiB took
# 0.85 s instead of 25 ms). Iterating in large blocks keeps uploads at wire speed.
_SEND_BLOCK = 1 << 20


class RemoteError(SnapstoreError):
    """The object store failed or refused a request."""


class RemoteAccessError(RemoteError):
    """The endpoint is unreachable, the bucket missing, or access denied: retrying won't help."""


class _Body(io.BytesIO):
    """An upload body that httpx sends in large blocks (see _SEND_BLOCK)."""

    def __iter__(self) -> Iterator[bytes]:
        while block := self.read(_SEND_BLOCK):
            yield block


class S3Store:
    """One bucket prefix. Create with `open_s3`."""

    kinds: frozenset[Kind] = frozenset(PREFIXES)

    def __init__(self, client: Any, url: RemoteURL, endpoint: str,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> None:
        self._client = client
        self.url = url
        self.endpoint = endpoint
        self.read_timeout_s = read_timeout_s

    # -- the Backend verbs -----------------------------------------------------------

    def _key(self, h: Handle) -> str:
        check_kind(self.kinds, h.kind)
        return key_of(h)

    def where(self, h: Handle) -> str:
        """The object's URL, for messages."""
        return self._where(self._key(h))

    async def save(self, h: Handle, data: bytes) -> None:
        key = self._key(h)
        await self._call("PUT", key, self._client.put_object, Bucket=self.url.bucket,
                         Key=self.url.key(key), Body=_Body(data))

    async def create(self, h: Handle, data: bytes) -> bool:
        key = self._key(h)
        try:
            await self._client.put_object(Bucket=self.url.bucket, Key=self.url.key(key),
                                          Body=_Body(data), IfNoneMatch="*")
        except ClientError as e:
            if _code(e) in ("PreconditionFailed", "412"):
                return False
            # A conditional write racing another on the same key; the other one won.
            if _code(e) == "ConditionalRequestConflict":
                return False
            raise self._error("PUT", key, e) from None
        except BotoCoreError as e:
            raise self._error("PUT", key, e) from None
        return True

    async def load(self, h: Handle, max_bytes: int) -> bytes:
        key = self._key(h)

        async def request() -> dict[str, Any] | None:
            resp: dict[str, Any] = await self._call(
                "GET", key, self._client.get_object, Bucket=self.url.bucket,
                Key=self.url.key(key))
            return resp

        with self._deadline("GET", key):
            return await self._body(key, request, max_bytes, CorruptError)

    async def load_range(self, h: Handle, start: int, end: int) -> bytes:
        key = self._key(h)
        where = f"{key} [{start}, {end})"

        async def request() -> dict[str, Any] | None:
            try:
                resp: dict[str, Any] = await self._client.get_object(
                    Bucket=self.url.bucket, Key=self.url.key(key),
                    Range=f"bytes={start}-{end - 1}")
            except ClientError as e:
                if _code(e) == "InvalidRange":
                    return None  # the object ends before `start`
                raise self._error("GET", where, e) from None
            except BotoCoreError as e:
                raise self._error("GET", where, e) from None
            if "ContentRange" not in resp:
                # Checked before the body: a server ignoring Range sends the whole
                # object, which may be any size.
                await resp["Body"].aclose()
                raise RemoteError(f"GET {self._where(where)}: the server ignored the range")
            return resp

        with self._deadline("GET", where):
            return await self._body(where, request, end - start, RemoteError)

    async def stat(self, h: Handle) -> int | None:
        key = self._key(h)
        try:
            with self._deadline("HEAD", key):
                r = await self._call("HEAD", key, self._client.head_object,
                                     Bucket=self.url.bucket, Key=self.url.key(key))
        except NotFoundError:
            return None
        return int(r["ContentLength"])

    async def remove(self, *hs: Handle) -> None:
        await self._delete([self._key(h) for h in hs])

    async def list(self, kind: Kind, strays: Callable[[str], object] | None = None
                   ) -> AsyncIterator[ObjectInfo]:
        check_kind(self.kinds, kind)
        prefix = PREFIXES[kind]
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.url.bucket, Prefix=self.url.key(prefix))
        try:
            async for page in pages:
                for o in page.get("Contents", ()):
                    key = self.url.rel(o["Key"])
                    name = name_of_key(kind, key)
                    if name is not None:
                        yield ObjectInfo(name, int(o["Size"]), o["LastModified"])
                    elif strays is not None:
                        strays(key)
        except (ClientError, BotoCoreError) as e:
            raise self._error("LIST", prefix, e) from None

    async def _body(self, where: str, request: Callable[[], Awaitable[dict[str, Any] | None]],
                    cap: int, too_long: type[SnapstoreError]) -> bytes:
        """The body of the GET that `request` sends (b"" where it answers None), at most
        `cap` bytes (else `too_long`). A body cut off, or failing the object's checksum,
        is asked for again, BODY_ATTEMPTS times in all."""
        for attempt in range(1, BODY_ATTEMPTS + 1):
            resp = await request()
            if resp is None:
                return b""
            try:
                return await _read_capped(resp, cap, self._where(where), too_long)
            except (BotoCoreError, OSError) as e:
                if attempt < BODY_ATTEMPTS:
                    await trio.sleep(0.05 * 2**attempt)
                    continue
                # S3 checks a whole object, and a range that is the whole object, against
                # its stored checksum.
                if isinstance(e, FlexibleChecksumError):
                    raise CorruptError(f"GET {self._where(where)}: the body failed the "
                                       f"object's checksum {BODY_ATTEMPTS} times") from None
                raise RemoteError(f"GET {self._where(where)}: the body was cut off "
                                  f"{BODY_ATTEMPTS} times ({type(e).__name__})") from None
        raise AssertionError("unreachable")

    async def _delete(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": self.url.key(k)} for k in keys[i : i + _DELETE_BATCH]]
            r = await self._call("DELETE", keys[i], self._client.delete_objects,
                                 Bucket=self.url.bucket,
                                 Delete={"Objects": batch, "Quiet": True})
            errors = r.get("Errors") or []
            if errors:
                first = errors[0]
                raise RemoteError(f"DELETE {self._where(self.url.rel(first.get('Key', '')))}: "
                                  f"{first.get('Code')} ({len(errors)} keys failed)")

    async def probe(self) -> None:
        """Fail fast, with one clear line, when the bucket is unreachable or refused."""
        await self._call("HEAD", "", self._client.head_bucket, Bucket=self.url.bucket)

    # -- errors --------------------------------------------------------------------

    @contextlib.contextmanager
    def _deadline(self, op: str, key: str) -> Iterator[None]:
        """Bound a read, its retries included: a server that takes the request and never
        answers fails it, instead of holding a reader (a mount's, in D state) for every
        attempt's full timeout. Cancelling the block cancels the request on the wire."""
        with trio.move_on_after(self.read_timeout_s) as scope:
            yield
        if scope.cancelled_caught:
            raise RemoteError(f"{op} {self._where(key)}: no complete answer within "
                              f"{self.read_timeout_s:g} s (--read-timeout)")

    async def _call(self, op: str, key: str, fn: Callable[..., Awaitable[T]],
                    **kwargs: Any) -> T:
        try:
            return await fn(**kwargs)
        except (ClientError, BotoCoreError) as e:
            raise self._error(op, key, e) from None

    def _where(self, key: str) -> str:
        return f"{self.url}/{key}" if key else str(self.url)

    def _error(self, op: str, key: str, e: ClientError | BotoCoreError) -> SnapstoreError:
        # Messages are built from error codes, never from request data: no credential leaks.
        if not isinstance(e, ClientError):
            if "Connect" in type(e).__name__:
                return RemoteAccessError(f"cannot reach the S3 endpoint {self.endpoint} "
                                   f"({type(e).__name__}); check --endpoint-url")
            return RemoteError(f"{op} {self._where(key)}: {type(e).__name__}")
        code = _code(e)
        if code in ("NoSuchKey", "404") and key:
            return NotFoundError(f"{self._where(key)} does not exist")
        if code in ("NoSuchBucket", "404"):
            return RemoteAccessError(
                f"bucket {self.url.bucket!r} does not exist at {self.endpoint}")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken", "InvalidToken"):
            return RemoteAccessError(f"access to {self.url} denied ({code}); check the AWS "
                               "credentials and the bucket policy")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return RemoteError(f"{op} {self._where(key)} failed: {code} (HTTP {status})")


async def _read_capped(resp: dict[str, Any], cap: int, where: str,
                       error: type[SnapstoreError]) -> bytes:
    """The body of `resp`, refused unread (`error`) when its Content-Length is over `cap`.
    A body without a Content-Length (chunked, or ended by closing the connection) could
    be of any size: S3 always sends one, so such a response is refused unread too. With
    the length checked, the HTTP client ends the body there, so no more is ever read."""
    async with resp["Body"] as body:
        length = resp.get("ContentLength")
        if length is None:
            raise RemoteError(f"GET {where}: the response has no Content-Length")
        if int(length) > cap:
            raise error(f"{where} is {length} bytes, more than the {cap} it may have")
        # One read of the whole body: reading it in pieces costs a copy of what the
        # client buffered for every piece (measured: 40% more CPU for a pull).
        data: bytes = await body.read()
        return data


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def endpoint_url(explicit: str | None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL") or None


def read_timeout(explicit: float | None) -> float:
    """The deadline of one read in seconds: --read-timeout, else $SNAPSTORE_READ_TIMEOUT,
    else the default; UsageError unless it is a number in (0, MAX_READ_TIMEOUT_S]."""
    text = os.environ.get("SNAPSTORE_READ_TIMEOUT", "") if explicit is None else ""
    if explicit is not None:
        value = explicit
    elif text.strip():
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"SNAPSTORE_READ_TIMEOUT is not a number: {text!r:.40}") from None
    else:
        return DEFAULT_READ_TIMEOUT_S
    if not 0 < value <= MAX_READ_TIMEOUT_S:  # also refuses nan
        raise UsageError(f"the read timeout must be more than 0 and at most "
                         f"{MAX_READ_TIMEOUT_S:g} seconds, got {value:g}")
    return value


@contextlib.asynccontextmanager
async def open_s3(url: RemoteURL, endpoint: str | None = None, connections: int = 32,
                  read_timeout_s: float | None = None) -> AsyncIterator[S3Store]:
    """A store for `url`, its bucket checked; credentials and region the standard AWS ways;
    reads bounded by `read_timeout_s` (None: see `read_timeout`)."""
    deadline = read_timeout(read_timeout_s)
    config = AioConfig(
        http_session_cls=aiobotocore.httpxsession.HttpxSession,
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=ATTEMPT_READ_TIMEOUT_S,
        max_pool_connections=connections,
    )
    session = AioSession()
    where = endpoint or "the default AWS endpoint"
    try:
        client_cm = session.create_client("s3", endpoint_url=endpoint, config=config)
        client = await client_cm.__aenter__()
    except BotoCoreError as e:
        raise RemoteError(f"cannot set up an S3 client for {url}: {type(e).__name__}: "
                          f"{_safe(str(e))}") from None
    try:
        store = S3Store(client, url, where, deadline)
        await _probe(session, url, endpoint, where)
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await client_cm.__aexit__(None, None, None)


async def _probe(session: AioSession, url: RemoteURL, endpoint: str | None, where: str) -> None:
    # One attempt and a short timeout: a wrong endpoint or a missing bucket fails in
    # seconds instead of after the main client's full retry schedule.
    config = AioConfig(
        http_session_cls=aiobotocore.httpxsession.HttpxSession,
        retries={"mode": "standard", "max_attempts": 1},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=CONNECT_TIMEOUT_S,
    )
    async with session.create_client("s3", endpoint_url=endpoint, config=config) as client:
        try:
            await S3Store(client, url, where).probe()
        except RemoteAccessError:
            raise
        except RemoteError:
            return  # transient (5xx, throttling): left to the main client's retries


def _safe(text: str) -> str:
    """Drop anything that could be a credential from a library's message."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value:
            text = text.replace(value, "***")
    return text
