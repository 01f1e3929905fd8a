"""Local paths and s3:// URLs behind one small API (fsspec / s3fs), with atomic writes.

The S3 endpoint comes from config (storage.endpoint_url) or AWS_ENDPOINT_URL, so the same code
talks to AWS, MinIO or a local test server. Errors never include credentials.
"""
from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import uuid
from pathlib import Path

import fsspec

_endpoint_override: str = ""
S3_MAX_ATTEMPTS = 5  # botocore's standard retry mode: exponential backoff on transient errors
# s3fs retries on top of botocore (5 rounds by default, SlowDown included): nested, a store that
# keeps failing cost 25+ requests and over a minute before the error surfaced. botocore owns
# request retries; the one extra s3fs round covers what botocore cannot see, a body cut off mid-read.
S3FS_ROUNDS = 2


class StorageError(Exception):
    """A user-facing storage problem (missing bucket, bad credentials, unreachable endpoint)."""


def set_endpoint(endpoint_url: str) -> None:
    """Process-wide S3 endpoint (from config); AWS_ENDPOINT_URL is used when this is empty."""
    global _endpoint_override
    _endpoint_override = endpoint_url or ""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url  # so worker processes and Ray see it too


def endpoint() -> str:
    return _endpoint_override or os.environ.get("AWS_ENDPOINT_URL", "")


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


_filesystems: dict[tuple, fsspec.AbstractFileSystem] = {}


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    if not is_s3(url):
        return fsspec.filesystem("file")
    # one client per process and endpoint: keyed by pid because an s3fs client (its event loop
    # and connections) does not survive fork into DataLoader workers
    key = (os.getpid(), endpoint())
    if key not in _filesystems:
        import s3fs
        # botocore says where it found credentials, at INFO, in every process that opens S3; in
        # Ray Train's workers (root logger at INFO, to the console) that was a line per worker
        for name in ("botocore.credentials", "aiobotocore.credentials"):
            logging.getLogger(name).setLevel(logging.WARNING)
        kwargs = {"endpoint_url": endpoint()} if endpoint() else {}
        _filesystems[key] = s3fs.S3FileSystem(
            skip_instance_cache=True, client_kwargs=kwargs,
            config_kwargs={"retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}})
        _filesystems[key].retries = S3FS_ROUNDS  # a class attribute: the constructor does not take it
    return _filesystems[key]


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


def _describe(url: str, e: Exception) -> str:
    kind = type(e).__name__
    msg = str(e).splitlines()[0] if str(e) else kind
    return f"{url}: {kind}: {msg}"


def exists(url: str) -> bool:
    try:
        return filesystem(url).exists(url)
    except Exception as e:  # noqa: BLE001 - mapped to one clear error
        raise StorageError(_describe(url, e)) from None


def read_bytes(url: str) -> bytes:
    try:
        with filesystem(url).open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"not found: {url}") from None
    except Exception as e:  # noqa: BLE001
        raise StorageError(_describe(url, e)) from None


def open_read(url: str):
    try:
        return filesystem(url).open(url, "rb")
    except FileNotFoundError:
        raise StorageError(f"not found: {url}") from None
    except Exception as e:  # noqa: BLE001
        raise StorageError(_describe(url, e)) from None


def put_file(local_path: str | Path, url: str) -> None:
    """Publish a finished local file at url, atomically: a reader sees the whole file or none.
    Locally a rename in the target directory; on S3 one PUT (objects appear whole)."""
    try:
        if is_s3(url):
            filesystem(url).put_file(str(local_path), url)
        else:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(url).with_name(f".{Path(url).name}.{uuid.uuid4().hex}.tmp")
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, url)
    except Exception as e:  # noqa: BLE001
        raise StorageError(_describe(url, e)) from None


def write_bytes(url: str, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(delete=False) as tmp:
        tmp.write(data)
    try:
        put_file(tmp.name, url)
    finally:
        os.unlink(tmp.name)


def remove(url: str) -> None:
    try:
        fs = filesystem(url)
        if fs.exists(url):
            fs.rm(url, recursive=True)
    except Exception as e:  # noqa: BLE001
        raise StorageError(_describe(url, e)) from None


def check_writable(url: str) -> None:
    """Fail early, with one clear line, if the destination bucket is missing or refuses writes."""
    probe = join(url, f".write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except StorageError as e:
        raise StorageError(f"cannot write to {url}: {str(e).split(': ', 1)[-1]}") from None
