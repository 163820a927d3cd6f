"""Where media comes from: bytes, data: URLs, base64 strings, local paths and (behind a switch) http(s).

Everything ends up as bytes in memory; nothing is written to disk and nothing is run. Decoding is
the processors' job (image.py, video.py); this module only finds the bytes and holds them to
`MediaLimits`. Objects already in memory (PIL images, numpy arrays, frame lists) pass through.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from qwenrun.errors import InvalidRequestError
from qwenrun.multimodal.limits import MediaLimits

Kind = Literal["image", "video"]

_FETCH_CHUNK = 64 * 1024


def _label(kind: Kind, param: str | None) -> str:
    return f"{kind} {param}" if param else kind


def max_bytes(kind: Kind, limits: MediaLimits) -> int:
    return limits.max_image_bytes if kind == "image" else limits.max_video_bytes


def check_size(n: int, kind: Kind, limits: MediaLimits, param: str | None) -> None:
    if n > max_bytes(kind, limits):
        raise InvalidRequestError(
            f"{_label(kind, param)} is {n} bytes; at most {max_bytes(kind, limits)} are allowed",
            param=param,
        )


def decode_base64(
    text: str, kind: Kind, limits: MediaLimits, param: str | None, hint: str = ""
) -> bytes:
    """Strict base64 (whitespace allowed), refused by length before anything is decoded.

    `hint` is added to the error: what else the string could have been.
    """
    compact = "".join(text.split())
    check_size(len(compact) * 3 // 4, kind, limits, param)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequestError(
            f"{_label(kind, param)} is not valid base64 ({e}){hint}", param=param
        ) from e
    if not data:
        raise InvalidRequestError(f"{_label(kind, param)} is empty", param=param)
    return data


def decode_data_url(url: str, kind: Kind, limits: MediaLimits, param: str | None) -> bytes:
    """`data:[<media type>][;base64],<data>` (RFC 2397); the media type must be the item's kind."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidRequestError(
            f"{_label(kind, param)}: data URL has no ',' before its data", param
        )
    media_type, _, params = header.partition(";")
    if media_type and not media_type.lower().startswith(f"{kind}/"):
        raise InvalidRequestError(
            f"{_label(kind, param)}: data URL has media type {media_type!r}, expected {kind}/*",
            param,
        )
    if "base64" in params.lower().split(";"):
        return decode_base64(payload, kind, limits, param)
    check_size(len(payload), kind, limits, param)
    data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise InvalidRequestError(f"{_label(kind, param)} is empty", param=param)
    return data


def read_path(path: str | Path, kind: Kind, limits: MediaLimits, param: str | None) -> bytes:
    if not limits.allow_local_paths:
        raise InvalidRequestError(
            f"{_label(kind, param)}: local file paths are not accepted here; send the data inline "
            "(a data: URL or base64)",
            param=param,
        )
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"{_label(kind, param)}: no such file {str(p)!r}", param=param)
    check_size(p.stat().st_size, kind, limits, param)
    return p.read_bytes()


def fetch_url(
    url: str,
    kind: Kind,
    limits: MediaLimits,
    param: str | None = None,
    transport: Any = None,
) -> bytes:
    """GET an http(s) URL within the limits: off unless `limits.allow_http`; size, total time and redirects capped.

    The size cap is enforced on the stream (a lying or missing Content-Length cannot get past it) and
    the time cap is a deadline over the whole transfer, not httpx's per-read timeout. `transport` is
    for tests (an `httpx.MockTransport`).
    """
    if not limits.allow_http:
        raise InvalidRequestError(
            f"{_label(kind, param)}: fetching http(s) URLs is disabled; send the data inline "
            "(a data: URL or base64), or start the server with URL fetching enabled",
            param=param,
        )
    import httpx

    deadline = time.monotonic() + limits.fetch_timeout_s
    try:
        with (
            httpx.Client(
                follow_redirects=True,
                max_redirects=limits.fetch_max_redirects,
                timeout=limits.fetch_timeout_s,
                transport=transport,
            ) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise InvalidRequestError(
                    f"{_label(kind, param)}: GET {url} answered HTTP {response.status_code}", param
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit():
                check_size(int(declared), kind, limits, param)
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes(_FETCH_CHUNK):
                size += len(chunk)
                check_size(size, kind, limits, param)
                if time.monotonic() > deadline:
                    raise InvalidRequestError(
                        f"{_label(kind, param)}: GET {url} took longer than {limits.fetch_timeout_s} s",
                        param,
                    )
                chunks.append(chunk)
    except httpx.TooManyRedirects as e:
        raise InvalidRequestError(
            f"{_label(kind, param)}: GET {url} redirected more than {limits.fetch_max_redirects} times",
            param,
        ) from e
    except httpx.TimeoutException as e:
        raise InvalidRequestError(
            f"{_label(kind, param)}: GET {url} took longer than {limits.fetch_timeout_s} s", param
        ) from e
    except httpx.HTTPError as e:
        raise InvalidRequestError(f"{_label(kind, param)}: GET {url} failed ({e})", param) from e
    data = b"".join(chunks)
    if not data:
        raise InvalidRequestError(f"{_label(kind, param)}: GET {url} returned no data", param=param)
    return data


def read_bytes(
    source: str | Path | bytes | bytearray | memoryview,
    kind: Kind,
    limits: MediaLimits,
    param: str | None = None,
) -> bytes:
    """The bytes of an encoded image or video, from any of the ways users name one.

    Strings are read the way transformers' `load_image` reads them, in this order: http(s) URL, local
    file, otherwise base64 (plus `data:` and `file://` URLs, which OpenAI clients send). Where local
    paths are not allowed a bare string is only ever base64: the disk is never probed for it.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        check_size(len(data), kind, limits, param)
        if not data:
            raise InvalidRequestError(f"{_label(kind, param)} is empty", param=param)
        return data
    if isinstance(source, Path):
        return read_path(source, kind, limits, param)
    if not isinstance(source, str):
        raise InvalidRequestError(
            f"{_label(kind, param)}: unsupported input type {type(source).__name__}", param=param
        )
    head = source[:16].lower()
    if head.startswith("data:"):
        return decode_data_url(source, kind, limits, param)
    if head.startswith(("http://", "https://")):
        return fetch_url(source, kind, limits, param)
    if head.startswith("file://"):
        return read_path(
            urllib.parse.unquote(urllib.parse.urlparse(source).path), kind, limits, param
        )
    if limits.allow_local_paths and len(source) < 4096 and os.path.isfile(source):
        return read_path(source, kind, limits, param)
    if limits.allow_local_paths:
        hint = "; nor is it an http(s) or data: URL or an existing file"
    else:
        hint = "; nor is it an http(s) or data: URL (local file paths are not accepted here)"
    return decode_base64(source, kind, limits, param, hint)
