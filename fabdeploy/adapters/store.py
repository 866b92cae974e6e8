"""The only module that talks to S3: bundles, the published pointer, history, the lock.

Everything here turns botocore failures into `StoreError` lines that say what
failed, where (s3://bucket/key and the endpoint) and what to do, so tasks can
print them without a traceback. Lost conditional writes are `ConflictError`.

Concurrency rests on S3 conditional writes, not on a separate lock service:
bundles are created with If-None-Match: * (two builders never overwrite each
other), the pointer is replaced with If-Match: <etag> (a publish that raced
another one fails instead of silently undoing it), and the fleet lock is an
object created with If-None-Match: * and deleted with If-Match.

boto3 is imported lazily: `fab --list` imports this module and must stay fast.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from fabdeploy.adapters import boto
from fabdeploy.basics.config import Config, S3Config
from fabdeploy.basics.errors import ConflictError, StoreError

PART_SIZE = 8 * 1024 * 1024
# Parts in flight at once. Bounds memory to ~(UPLOAD_THREADS + 1) * PART_SIZE
# whatever the bundle size, while keeping the connection pool busy.
UPLOAD_THREADS = 4
HISTORY_SPAN = 10**13  # ms; inverted timestamps stay 13 digits until year 2286
METADATA_KEYS = (
    "commit",
    "ref",
    "sha256",
    "size",
    "built-at",
    "built-by",
    "app",
    "committed-at",
    "bundle-id",
    "pack",
    "recipe-sha256",
    "recipe",
)


class _BadJSON(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _BadJSON(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadJSON(f"number {text[:20]} is out of range")
    return value


def load_json(data: bytes) -> Any:
    """json.loads for objects anyone with bucket access may have written: NaN, Infinity,
    1e999 and nesting deep enough to exhaust the recursion limit are ValueErrors, like
    any other malformed input, so callers catch one exception type."""
    try:
        return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise _BadJSON("nested too deeply") from None


def now_iso() -> str:
    """UTC, second precision: the one timestamp format of bundle metadata and pointers."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_duration(seconds: float) -> str:
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


@dataclass(frozen=True)
class Pointer:
    """The published bundle; JSON at {prefix}/published.json."""

    key: str
    commit: str
    sha256: str
    ref: str
    size: int
    published_by: str
    published_at: str  # UTC ISO 8601
    committed_at: int | None = None
    # Signed releases: one above the pointer this one replaced, and the signed envelope
    # (adapters/signing.py) that nodes trust instead of the fields above.
    sequence: int | None = None
    signed: dict[str, str] | None = None
    # The commit when there is no build recipe (adapters/bundle.py: bundle_id); absent in
    # pointers written before recipes existed, which means the commit too.
    bundle_id: str | None = None

    @property
    def id(self) -> str:
        return self.bundle_id or self.commit

    def to_json(self) -> bytes:
        data = {k: v for k, v in asdict(self).items() if v is not None or k == "committed_at"}
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Pointer:
        try:
            raw = load_json(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(
                f"{where} is not valid JSON ({_short(e)}); fix or re-publish it with `fab deploy.publish`"
            ) from None
        if not isinstance(raw, dict):
            raise StoreError(f"{where} is not a JSON object; re-publish with `fab deploy.publish`")
        str_fields = ("key", "commit", "sha256", "ref", "published_by", "published_at")
        missing = [f for f in (*str_fields, "size") if f not in raw]
        if missing:
            raise StoreError(
                f"{where} lacks {', '.join(missing)}; re-publish with `fab deploy.publish`"
            )
        bad = [f for f in str_fields if not isinstance(raw[f], str) or not raw[f]]
        if not _is_int(raw["size"]) or not 0 <= raw["size"] < 2**63:
            bad.append("size")
        committed_at = raw.get("committed_at")
        if committed_at is not None and (
            not _is_int(committed_at) or not 0 <= committed_at < 2**63
        ):
            bad.append("committed_at")
        sequence = raw.get("sequence")
        if sequence is not None and (not _is_int(sequence) or not 0 <= sequence < 2**63):
            bad.append("sequence")
        signed = raw.get("signed")
        if signed is not None and not (
            isinstance(signed, dict)
            and isinstance(signed.get("payload"), str)
            and isinstance(signed.get("signature"), str)
        ):
            bad.append("signed")
        bid = raw.get("bundle_id")
        if bid is not None and (not isinstance(bid, str) or not bid):
            bad.append("bundle_id")
        if bad:
            raise StoreError(
                f"{where} has invalid {', '.join(bad)}; re-publish with `fab deploy.publish`"
            )
        return cls(
            key=raw["key"],
            commit=raw["commit"],
            sha256=raw["sha256"],
            ref=raw["ref"],
            size=raw["size"],
            published_by=raw["published_by"],
            published_at=raw["published_at"],
            committed_at=committed_at,
            sequence=sequence,
            signed=signed,
            bundle_id=bid,
        )


@dataclass(frozen=True)
class Lock:
    """The fleet lock; JSON at {prefix}/lock.json. `etag` identifies our copy."""

    holder: str
    action: str
    created_at: float
    expires_at: float
    etag: str | None = None
    pid: int | None = None  # of the fab process on the holder's machine (see dead_local_holder)
    # Which kernel that pid belongs to: the holder's /etc/machine-id, boot id and pid namespace.
    machine_id: str | None = None
    boot_id: str | None = None
    pidns: str | None = None
    unparsable: bool = False  # only from break_lock(force=True): an object we could not read

    @classmethod
    def unreadable(cls, etag: str | None) -> Lock:
        return cls(
            holder="(unreadable)",
            action="unknown",
            created_at=time.time(),
            expires_at=0.0,
            etag=etag,
            unparsable=True,
        )

    @property
    def age(self) -> float:
        return max(0.0, time.time() - self.created_at)

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at

    @property
    def dead_local_holder(self) -> bool:
        """Taken by a fab process on this machine that no longer runs (kill -9, crash, power cut
        of the controller's terminal): nobody can release it, and nobody is deploying.

        "This machine" is the same machine id, boot and pid namespace, not the same hostname:
        CI runners, containers and cloned VMs share hostnames (and reuse pids), and breaking a
        live lock of another machine would let two deploys run at once."""
        mine = local_identity()
        if self.pid is None or None in mine or (self.machine_id, self.boot_id, self.pidns) != mine:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except (OSError, OverflowError):
            return False
        return False

    def describe(self) -> str:
        return f"{self.holder} ({self.action}) for {human_duration(self.age)}"

    def to_json(self) -> bytes:
        body = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("etag", "unparsable") and not (k in _OPTIONAL_LOCK_FIELDS and v is None)
        }
        return (json.dumps(body, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str, etag: str | None) -> Lock:
        try:
            raw = load_json(data)
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            holder, action = raw["holder"], raw["action"]
            created_at, expires_at = raw["created_at"], raw["expires_at"]
            if not (isinstance(holder, str) and isinstance(action, str)):
                raise TypeError("holder and action must be strings")
            if not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and abs(t) < 1e11
                for t in (created_at, expires_at)
            ):
                raise TypeError("created_at and expires_at must be timestamps")
            pid = raw.get("pid")
            return cls(
                holder=holder,
                action=action,
                created_at=float(created_at),
                expires_at=float(expires_at),
                etag=etag,
                pid=pid
                if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31
                else None,
                machine_id=_id_field(raw.get("machine_id")),
                boot_id=_id_field(raw.get("boot_id")),
                pidns=_id_field(raw.get("pidns")),
            )
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            raise StoreError(
                f"{where} is not a valid lock; if nobody is deploying, remove it with `fab deploy.unlock --force`"
            ) from None


_OPTIONAL_LOCK_FIELDS = ("pid", "machine_id", "boot_id", "pidns")


def _read_id(path: str, link: bool = False) -> str | None:
    try:
        value = os.readlink(path) if link else Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value or None


_identity: tuple[str | None, str | None, str | None] | None = None


def local_identity() -> tuple[str | None, str | None, str | None]:
    """(machine id, boot id, pid namespace) of this process; None where unreadable."""
    global _identity
    if _identity is None:
        _identity = (
            _read_id("/etc/machine-id"),
            _read_id("/proc/sys/kernel/random/boot_id"),
            _read_id("/proc/self/ns/pid", link=True),
        )
    return _identity


def _id_field(value: object) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 100 else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(e: BaseException, limit: int = 120) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _meta_value(value: object) -> str:
    # S3 user metadata travels in HTTP headers: ASCII only. Quote anything else
    # (a branch name with non-ASCII characters) rather than fail the upload.
    s = str(value)
    return s if s.isascii() and s.isprintable() else quote(s, safe="")


def _chunks(source: IO[bytes] | Iterable[bytes], size: int) -> Iterator[bytes]:
    """Re-cut a file object or an iterable of byte strings into `size`-byte parts."""
    if hasattr(source, "read"):
        reader: IO[bytes] = source  # type: ignore[assignment]
        while True:
            part = reader.read(size)
            # read() may return short on pipes; top up so only the last part is small
            while part and len(part) < size:
                more = reader.read(size - len(part))
                if not more:
                    break
                part += more
            if not part:
                return
            yield part
            if len(part) < size:
                return
    else:
        buf = bytearray()
        for piece in source:  # type: ignore[union-attr]
            buf += piece
            while len(buf) >= size:
                yield bytes(buf[:size])
                del buf[:size]
        if buf:
            yield bytes(buf)


class _FileSlice(io.RawIOBase):
    """A read-only window [start, start+length) of a file, read with pread.

    Parts of a spooled bundle are sent straight from the file: no 8 MiB
    copies per part, so memory does not depend on bundle size (and glibc does
    not keep freed part buffers around in per-thread arenas), and retries can
    rewind. pread keeps the shared fd's offset out of it, so threads do not race.
    """

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd, self._start, self._len, self._pos = fd, start, length, 0

    def __len__(self) -> int:
        return self._len

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = min(max(0, base + offset), self._len)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = self._len - self._pos
        n = left if size is None or size < 0 else min(size, left)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._start + self._pos)
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _file_slices(fileobj: Any, size_hint: int | None) -> Iterator[_FileSlice] | None:
    """Part-sized slices of a regular, seekable file; None if it is not one."""
    try:
        fd = fileobj.fileno()
        start = fileobj.tell()
        total = os.fstat(fd).st_size - start
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    if size_hint is not None and size_hint != total:
        return None
    return (
        _FileSlice(fd, start + off, min(PART_SIZE, total - off))
        for off in range(0, total, PART_SIZE)
    )


class Store:
    def __init__(self, s3: S3Config, app: str, config_path: Path | None = None) -> None:
        self.s3 = s3
        self.app = app
        self.config_path = config_path
        self.prefix = s3.prefix.strip("/")
        self._client_obj: Any = None
        self._client_lock = threading.Lock()
        self._deferred: list[threading.Thread] = []
        self._deferred_errors: list[StoreError] = []

    # --- plumbing -----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.s3.endpoint_url or f"AWS S3 ({self.s3.region or 'default region'})"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def uri(self, key: str) -> str:
        return f"s3://{self.s3.bucket}/{key}"

    def bundle_key(self, bundle_id: str) -> str:
        """bundles/<id>.tar.gz; the id is the commit when deploy.yml has no build recipe."""
        return self._key(f"bundles/{bundle_id}.tar.gz")

    @property
    def pointer_key(self) -> str:
        return self._key("published.json")

    def manifest_key(self, commit: str) -> str:
        return self._key(f"manifests/{commit}.json")

    def put_manifest(self, commit: str, envelope: dict[str, str]) -> None:
        """A bundle's signed manifest; overwriting is harmless, since nodes check the signature."""
        key = self.manifest_key(commit)
        try:
            self.client.put_object(
                Bucket=self.s3.bucket,
                Key=key,
                ContentType="application/json",
                Body=(json.dumps(envelope, sort_keys=True) + "\n").encode(),
            )
        except Exception as e:
            raise self._error(e, key, "writing manifest") from None

    def get_manifest(self, commit: str) -> Any:
        """The signed manifest envelope as stored (unverified: the caller verifies), or None."""
        got = self._get(self.manifest_key(commit), "reading manifest")
        if got is None:
            return None
        try:
            return load_json(got[0])
        except (ValueError, UnicodeDecodeError):
            return {}

    @property
    def lock_key(self) -> str:
        return self._key("lock.json")

    @property
    def undo_key(self) -> str:
        return self._key("state/undo.json")

    @property
    def once_key(self) -> str:
        return self._key("state/once.json")

    @property
    def history_prefix(self) -> str:
        return self._key("history/")

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client_obj is None:
                self._client_obj = self._make_client()
            return self._client_obj

    def _make_client(self) -> Any:
        import boto3
        import botocore.config
        import botocore.exceptions

        try:
            session = boto3.Session(profile_name=self.s3.profile, region_name=self.s3.region)
        except botocore.exceptions.ProfileNotFound:
            raise StoreError(
                f"AWS profile {self.s3.profile!r} (s3.profile) not found in ~/.aws/config or ~/.aws/credentials: "
                "create it or fix s3.profile"
            ) from None
        cfg = botocore.config.Config(
            # boto3 >= 1.36 adds CRC checksums by default; several S3-compatible
            # servers reject them, and S3 itself does not need them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=UPLOAD_THREADS + 2,
            signature_version="s3v4",  # presigned URLs must be v4 on every region
        )
        client = session.client("s3", endpoint_url=self.s3.endpoint_url, config=cfg)
        _small_puts_without_expect(client)
        return client

    def _error(self, exc: BaseException, key: str | None, action: str) -> StoreError:
        """Map a botocore failure to one actionable line."""
        if isinstance(exc, StoreError):
            return exc
        where = self.uri(key) if key else f"s3://{self.s3.bucket}"
        f = boto.classify(exc)
        if f.kind == boto.NO_CREDENTIALS:
            return StoreError(
                "no AWS credentials found: set AWS_PROFILE/AWS_ACCESS_KEY_ID or s3.profile"
            )
        if f.kind == boto.NO_PROFILE:
            return StoreError(
                f"AWS profile {self.s3.profile!r} (s3.profile) not found: create it or fix s3.profile"
            )
        if f.kind == boto.UNREACHABLE:
            return StoreError(
                f"cannot reach S3 endpoint {self.endpoint} ({action} {where}): is it up?"
            )
        if f.kind == boto.SLOW:
            return StoreError(
                f"S3 endpoint {self.endpoint} timed out ({action} {where}): is it overloaded? retry"
            )
        if f.kind == boto.NO_BUCKET:
            return self._no_bucket()
        if f.kind == boto.CONFLICT:
            return ConflictError(
                f"{where} changed while we were writing it ({action}): {f.message}"
            )
        if f.kind == boto.BAD_CREDENTIALS:
            return StoreError(
                f"S3 at {self.endpoint} rejected the AWS credentials ({f.code}) for {where}: "
                "check AWS_PROFILE/AWS_ACCESS_KEY_ID or s3.profile"
            )
        if f.kind == boto.DENIED:
            return StoreError(
                f"access denied to {where} ({action}): check the credentials/IAM policy "
                "(s3:GetObject, s3:PutObject, s3:DeleteObject, s3:ListBucket on the bucket and prefix)"
            )
        if f.code:
            return StoreError(
                f"S3 {action} {where} failed at {self.endpoint}: {f.code} {f.message}".rstrip()
            )
        if f.kind == boto.API:
            return StoreError(f"S3 {action} {where} failed at {self.endpoint}: {f.message}")
        return StoreError(f"S3 {action} {where} failed: {exc}")

    def _no_bucket(self) -> StoreError:
        where = self.config_path or "deploy.yml"
        return StoreError(
            f"bucket {self.s3.bucket} does not exist at {self.endpoint}: create it or fix s3.bucket in {where}"
        )

    @staticmethod
    def _is_missing(exc: BaseException) -> bool:
        return boto.classify(exc).kind == boto.MISSING

    def _missing_object(self) -> None:
        """A HEAD 404 can't tell a missing key from a missing bucket; ask the bucket."""
        try:
            self.client.head_bucket(Bucket=self.s3.bucket)
        except Exception as e:
            if self._is_missing(e):
                raise self._no_bucket() from None
            raise self._error(e, None, "checking bucket") from None

    def _get(self, key: str, action: str) -> tuple[bytes, str] | None:
        try:
            r = self.client.get_object(Bucket=self.s3.bucket, Key=key)
            return r["Body"].read(), r["ETag"]
        except Exception as e:
            if self._is_missing(e):
                return None
            raise self._error(e, key, action) from None

    # --- bundles ------------------------------------------------------------------

    def head_bundle(self, bundle_id: str) -> dict[str, str] | None:
        key = self.bundle_key(bundle_id)
        try:
            r = self.client.head_object(Bucket=self.s3.bucket, Key=key)
        except Exception as e:
            if self._is_missing(e):
                self._missing_object()
                return None
            raise self._error(e, key, "checking bundle") from None
        meta = {k.lower(): v for k, v in r.get("Metadata", {}).items()}
        meta.setdefault("etag", r.get("ETag", ""))
        meta.setdefault("content-length", str(r.get("ContentLength", "")))
        return meta

    def upload_bundle(
        self,
        fileobj_or_iter: IO[bytes] | Iterable[bytes],
        bundle_id: str,
        metadata: dict[str, Any],
        size_hint: int | None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Create the bundle object; never replace one (If-None-Match: *).

        Fits in one part -> a single PutObject. Otherwise a multipart upload of
        PART_SIZE parts sent by a small thread pool: a regular file is sent
        slice by slice straight from disk, any other stream is read part by
        part, so memory is bounded by UPLOAD_THREADS parts whatever the size.
        Aborted on any failure so no half-upload lingers (and bills) in the bucket.
        ConflictError if the object appeared meanwhile.
        """
        key = self.bundle_key(bundle_id)
        meta = {str(k).lower(): _meta_value(v) for k, v in metadata.items() if v is not None}
        extra = {"Metadata": meta, "ContentType": "application/gzip"}
        client = self.client
        bodies: Iterator[Any] | None = _file_slices(fileobj_or_iter, size_hint)
        if bodies is None:
            bodies = _chunks(fileobj_or_iter, PART_SIZE)  # type: ignore[arg-type]
        first = next(bodies, b"")
        second = next(bodies, None)
        if second is None:
            try:
                client.put_object(
                    Bucket=self.s3.bucket, Key=key, Body=first, IfNoneMatch="*", **extra
                )
            except Exception as e:
                raise self._error(e, key, "uploading bundle") from None
            if progress:
                progress(len(first))
            return

        # A list popped as parts go, so the bytes path holds each part only until sent.
        head: list[Any] = [first, second]
        del first, second

        def all_parts() -> Iterator[Any]:
            while head:
                yield head.pop(0)
            yield from bodies

        parts = all_parts()

        try:
            upload_id = client.create_multipart_upload(Bucket=self.s3.bucket, Key=key, **extra)[
                "UploadId"
            ]
        except Exception as e:
            raise self._error(e, key, "starting bundle upload") from None
        done_lock = threading.Lock()
        etags: dict[int, str] = {}

        def send(number: int, body: Any) -> None:
            r = client.upload_part(
                Bucket=self.s3.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )
            with done_lock:
                etags[number] = r["ETag"]
            if progress:
                progress(len(body))

        try:
            with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="s3-part") as pool:
                pending: set[Future[None]] = set()
                for number, body in enumerate(parts, start=1):
                    if len(pending) >= UPLOAD_THREADS:
                        finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                        for f in finished:
                            f.result()
                    pending.add(pool.submit(send, number, body))
                for f in wait(pending).done:
                    f.result()
            client.complete_multipart_upload(
                Bucket=self.s3.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [{"ETag": etags[n], "PartNumber": n} for n in sorted(etags)]
                },
                IfNoneMatch="*",
            )
        except BaseException as e:
            try:
                client.abort_multipart_upload(Bucket=self.s3.bucket, Key=key, UploadId=upload_id)
            except Exception:
                pass  # best effort: the original failure is the one worth reporting
            if isinstance(e, Exception):
                raise self._error(e, key, "uploading bundle") from None
            raise

    def presign_bundle(self, bundle_id: str, expires: int = 3600) -> str:
        key = self.bundle_key(bundle_id)
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.s3.bucket, "Key": key}, ExpiresIn=expires
            )
        except Exception as e:
            raise self._error(e, key, "presigning bundle") from None

    def open_bundle(self, bundle_id: str) -> IO[bytes]:
        key = self.bundle_key(bundle_id)
        try:
            return self.client.get_object(Bucket=self.s3.bucket, Key=key)["Body"]
        except Exception as e:
            if self._is_missing(e):
                self._missing_object()
                raise StoreError(
                    f"no bundle at {self.uri(key)}: run `fab deploy.bundle` first"
                ) from None
            raise self._error(e, key, "downloading bundle") from None

    # --- published pointer ----------------------------------------------------------

    def read_pointer(self, *, replacing: bool = False) -> tuple[Pointer | None, str | None]:
        """`replacing`: the caller is about to overwrite it, so a corrupt pointer is reported
        as a warning and treated as absent (with its etag, so the write stays conditional);
        otherwise nobody could ever re-publish over it."""
        got = self._get(self.pointer_key, "reading pointer")
        if got is None:
            return None, None
        data, etag = got
        try:
            return Pointer.from_json(data, self.uri(self.pointer_key)), etag
        except StoreError as e:
            if not replacing:
                raise
            import sys

            print(f"warning: replacing a corrupt pointer: {e}", file=sys.stderr, flush=True)
            return None, etag

    def write_pointer(
        self, pointer: Pointer, expected_etag: str | None, *, defer_history: bool = False
    ) -> str:
        """Replace the pointer only if it is still what we read (or still absent).

        `defer_history`: the history entry is written in the background (one round trip off
        the caller's path, e.g. beside the lock's release); `finish_deferred()` waits for it
        and raises its error."""
        key = self.pointer_key
        cond = {"IfMatch": expected_etag} if expected_etag else {"IfNoneMatch": "*"}
        try:
            r = self.client.put_object(
                Bucket=self.s3.bucket,
                Key=key,
                Body=pointer.to_json(),
                ContentType="application/json",
                **cond,
            )
        except Exception as e:
            # If-Match on a pointer deleted meanwhile answers NoSuchKey: also a lost race.
            if isinstance(self._error(e, key, "publishing"), ConflictError) or (
                expected_etag and self._is_missing(e)
            ):
                raise self._conflict(pointer) from None
            raise self._error(e, key, "publishing") from None
        # History is written after the pointer so it only ever lists real publishes.
        if defer_history:
            t = threading.Thread(
                target=self._deferred_history, args=(pointer,), name="s3-history", daemon=True
            )
            self._deferred.append(t)
            t.start()
        else:
            self._write_history(pointer)
        return r["ETag"]

    def _deferred_history(self, pointer: Pointer) -> None:
        try:
            self._write_history(pointer)
        except StoreError as e:
            self._deferred_errors.append(e)

    def finish_deferred(self) -> None:
        """Wait for the writes started with defer_history; raise the first one's error."""
        while self._deferred:
            self._deferred.pop(0).join()
        if self._deferred_errors:
            raise self._deferred_errors.pop(0)

    def _write_history(self, pointer: Pointer) -> None:
        millis = int(time.time() * 1000)
        hkey = f"{self.history_prefix}{HISTORY_SPAN - millis:013d}-{pointer.commit[:12]}.json"
        try:
            self.client.put_object(
                Bucket=self.s3.bucket,
                Key=hkey,
                Body=pointer.to_json(),
                ContentType="application/json",
            )
        except Exception as e:
            err = self._error(e, hkey, "recording history")
            raise StoreError(
                f"published {pointer.commit[:12]}, but could not record it in history: {err}"
            ) from None

    def _conflict(self, mine: Pointer) -> ConflictError:
        try:
            current, _ = self.read_pointer()
        except StoreError:
            current = None
        if current is None:
            who = "the pointer was removed meanwhile"
        else:
            who = f"{current.published_by} published {current.commit[:12]} ({current.ref}) at {current.published_at} meanwhile"
        return ConflictError(
            f"publishing {mine.commit[:12]} to {self.uri(self.pointer_key)} lost a race: {who}; "
            "check what is published and retry"
        )

    def pointer_history(self, limit: int = 20, window: int = 8) -> Iterator[Pointer]:
        """The published pointers, newest first, read as the caller goes: one LIST, then the
        entries `window` at a time in parallel (a rollback usually stops at the first or
        second: one round trip, not one per entry read)."""
        try:
            r = self.client.list_objects_v2(
                Bucket=self.s3.bucket, Prefix=self.history_prefix, MaxKeys=limit
            )
        except Exception as e:
            raise self._error(e, self.history_prefix, "listing history") from None
        # Keys hold inverted millis, so S3's lexicographic listing is newest first.
        keys = [obj["Key"] for obj in r.get("Contents", [])[:limit]]
        if not keys:
            return
        with ThreadPoolExecutor(min(window, len(keys)), thread_name_prefix="history") as pool:
            for start in range(0, len(keys), window):
                chunk = keys[start : start + window]
                futures = [pool.submit(self._get, k, "reading history") for k in chunk]
                for key, fut in zip(chunk, futures, strict=True):
                    got = fut.result()
                    if got is None:
                        continue
                    # One damaged entry must not hide the others (nor abort a rollback's
                    # pointer move).
                    try:
                        yield Pointer.from_json(got[0], self.uri(key))
                    except StoreError as e:
                        import sys

                        print(
                            f"warning: skipped a damaged history entry: {e}",
                            file=sys.stderr,
                            flush=True,
                        )

    # --- fleet lock -------------------------------------------------------------------

    def read_lock(self) -> Lock | None:
        got = self._get(self.lock_key, "reading lock")
        if got is None:
            return None
        return Lock.from_json(got[0], self.uri(self.lock_key), got[1])

    def acquire_lock(self, holder: str, action: str, expiry: float) -> Lock:
        key = self.lock_key
        for _ in range(3):  # the holder may release between our failed create and our read
            now = time.time()
            machine_id, boot_id, pidns = local_identity()
            lock = Lock(
                holder=holder,
                action=action,
                created_at=now,
                expires_at=now + expiry,
                pid=os.getpid(),
                machine_id=machine_id,
                boot_id=boot_id,
                pidns=pidns,
            )
            try:
                r = self.client.put_object(
                    Bucket=self.s3.bucket,
                    Key=key,
                    Body=lock.to_json(),
                    ContentType="application/json",
                    IfNoneMatch="*",
                )
                return replace(lock, etag=r["ETag"])
            except Exception as e:
                err = self._error(e, key, "taking the deploy lock")
                if not isinstance(err, ConflictError):
                    raise err from None
            held = self.read_lock()
            if held is not None and held.dead_local_holder:
                try:  # conditional: if someone else took it meanwhile, theirs stays
                    self.client.delete_object(Bucket=self.s3.bucket, Key=key, IfMatch=held.etag)
                except Exception as e:
                    err = self._error(e, key, "breaking a dead holder's deploy lock")
                    if self._is_missing(e) or isinstance(err, ConflictError):
                        continue  # gone or replaced meanwhile: look again
                    raise err from None
                import sys

                print(
                    f"warning: broke the deploy lock of {held.describe()}: its process "
                    f"{held.pid} no longer runs on this machine (same machine id and boot)",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            if held is not None:
                raise StoreError(self._held_message(held))
        raise ConflictError(
            f"could not take the deploy lock {self.uri(key)}: it keeps changing; retry"
        )

    @staticmethod
    def _held_message(held: Lock) -> str:
        left = held.expires_at - time.time()
        if left <= 0:
            return (
                f"deploy lock held by {held.describe()}; it expired {human_duration(-left)} ago: "
                "wait, or if it is stale run `fab deploy.unlock`"
            )
        return (
            f"deploy lock held by {held.describe()} (expires in {human_duration(left)}); "
            "wait, or if it is stale run `fab deploy.unlock --force`"
        )

    def renew_lock(self, lock: Lock, expiry: float) -> Lock:
        """Push our lock's expiry out, only if it is still ours (If-Match on its ETag).

        ConflictError if it was broken (removed, or taken by someone else) meanwhile."""
        key = self.lock_key
        new = replace(lock, expires_at=time.time() + expiry)
        try:
            r = self.client.put_object(
                Bucket=self.s3.bucket,
                Key=key,
                Body=new.to_json(),
                ContentType="application/json",
                IfMatch=lock.etag,
            )
        except Exception as e:
            err = self._error(e, key, "renewing the deploy lock")
            if not (self._is_missing(e) or isinstance(err, ConflictError)):
                raise err from None
            try:
                current = self.read_lock()
            except StoreError:
                current = None
            if current is not None and (
                current.holder,
                current.created_at,
                current.pid,
                current.boot_id,
            ) == (lock.holder, lock.created_at, lock.pid, lock.boot_id):
                return current  # our own earlier renewal landed although its answer was lost
            who = f"now held by {current.describe()}" if current else "it was removed"
            raise ConflictError(f"our deploy lock {self.uri(key)} was broken: {who}") from None
        return replace(new, etag=r["ETag"])

    def release_lock(self, lock: Lock) -> None:
        """Delete our lock; already gone is fine, someone else's lock is left alone."""
        key = self.lock_key
        try:
            if lock.etag:
                self.client.delete_object(Bucket=self.s3.bucket, Key=key, IfMatch=lock.etag)
            else:
                self.client.delete_object(Bucket=self.s3.bucket, Key=key)
        except Exception as e:
            if self._is_missing(e):
                return
            err = self._error(e, key, "releasing the deploy lock")
            if isinstance(err, ConflictError):
                current = self.read_lock()
                if current is None:
                    return
                raise ConflictError(
                    f"our deploy lock was broken and is now held by {current.describe()}; left it in place"
                ) from None
            raise err from None

    def break_lock(self, force: bool = False) -> Lock | None:
        """Remove the lock if it expired, or its fab was killed on this machine (or always with
        force); returns what was removed.

        With force, a lock object that cannot even be parsed is removed too (conditionally
        on the ETag we read, so a lock taken meanwhile stays): that is what its error says to do."""
        key = self.lock_key
        got = self._get(key, "reading lock")
        if got is None:
            return None
        try:
            held = Lock.from_json(got[0], self.uri(key), got[1])
        except StoreError:
            if not force:
                raise
            held = Lock.unreadable(got[1])
        if not held.expired and not force and not held.dead_local_holder:
            raise StoreError(
                f"deploy lock held by {held.describe()} has not expired "
                f"(expires in {human_duration(held.expires_at - time.time())}): "
                "wait, or use `fab deploy.unlock --force` if you are sure nobody is deploying"
            )
        try:
            self.client.delete_object(Bucket=self.s3.bucket, Key=key, IfMatch=held.etag)
        except Exception as e:
            if self._is_missing(e):
                return held
            err = self._error(e, key, "breaking the deploy lock")
            if isinstance(err, ConflictError):
                raise ConflictError(
                    f"deploy lock {self.uri(key)} changed while breaking it (someone took it again); "
                    "check `fab deploy.status` and retry"
                ) from None
            raise err from None
        return held

    # --- nodes' boot reports ------------------------------------------------------------

    def report_key_ok(self, key: object) -> bool:
        """A key a node named for its boot report (node.py report_key): under our nodes/."""
        base = self._key("nodes/")
        return (
            isinstance(key, str)
            and key.startswith(base)
            and key.endswith(".json")
            and "/" not in key[len(base) :]
            and ".." not in key
        )

    def read_report(self, key: str) -> tuple[Any, str] | None:
        """A node's last boot report, parsed (None where it is not valid JSON), with its ETag;
        None if there is none."""
        got = self._get(key, "reading a node's boot report")
        if got is None:
            return None
        try:
            return load_json(got[0]), got[1]
        except (ValueError, UnicodeDecodeError):
            return None, got[1]

    # --- what a roll must undo (load balancers, ASG standby) -----------------------------

    def read_undo(self) -> tuple[Any, str | None]:
        """(the parsed undo state or None, its etag). StoreError if it is not valid JSON."""
        key = self.undo_key
        got = self._get(key, "reading the roll's undo state")
        if got is None:
            return None, None
        try:
            return load_json(got[0]), got[1]
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(
                f"{self.uri(key)} is not valid JSON ({_short(e)}): check the instances' load "
                "balancer registration and ASG standby/MinSize by hand, then delete it"
            ) from None

    def write_undo(self, state: dict[str, Any], expected_etag: str | None) -> str:
        """Replace the undo state only if it is still what we wrote (or still absent)."""
        key = self.undo_key
        cond = {"IfMatch": expected_etag} if expected_etag else {"IfNoneMatch": "*"}
        body = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
        try:
            r = self.client.put_object(
                Bucket=self.s3.bucket, Key=key, Body=body, ContentType="application/json", **cond
            )
        except Exception as e:
            err = self._error(e, key, "recording the roll's undo state")
            if expected_etag and self._is_missing(e):
                raise ConflictError(
                    f"{self.uri(key)} was removed by someone else meanwhile"
                ) from None
            raise err from None
        return str(r["ETag"])

    def delete_undo(self, expected_etag: str | None) -> None:
        key = self.undo_key
        try:
            if expected_etag:
                self.client.delete_object(Bucket=self.s3.bucket, Key=key, IfMatch=expected_etag)
            else:
                self.client.delete_object(Bucket=self.s3.bucket, Key=key)
        except Exception as e:
            if self._is_missing(e):
                return
            raise self._error(e, key, "clearing the roll's undo state") from None

    # --- bundles whose run-once hooks (migrations) succeeded -------------------------------

    def read_once(self) -> list[dict[str, Any]]:
        """The record of run-once hooks that succeeded, newest first ([] when there is none).
        StoreError if it is not a JSON object with a `bundles` list."""
        key = self.once_key
        got = self._get(key, "reading the run-once record")
        if got is None:
            return []
        try:
            data = load_json(got[0])
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{self.uri(key)} is not valid JSON ({_short(e)})") from None
        entries = data.get("bundles") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise StoreError(f"{self.uri(key)} has no `bundles` list")
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("bundle_id"), str)]

    def write_once(self, entries: list[dict[str, Any]]) -> None:
        """Replace the record (callers hold the fleet lock, so no one else writes it)."""
        key = self.once_key
        body = json.dumps({"version": 1, "bundles": entries}, indent=2, sort_keys=True) + "\n"
        try:
            self.client.put_object(
                Bucket=self.s3.bucket,
                Key=key,
                Body=body.encode(),
                ContentType="application/json",
            )
        except Exception as e:
            raise self._error(e, key, "recording the run-once hooks") from None


SMALL_PUT = 1 << 20  # below this a PUT is sent at once, without `Expect: 100-continue`


def _small_puts_without_expect(client: Any) -> None:
    """botocore sends every PUT with `Expect: 100-continue`: the headers, then a wait for S3's
    "100 Continue", then the body. That costs a whole extra round trip per PUT, and the lock,
    the pointer and its history entry are PUTs of a few hundred bytes on a deploy's critical
    path. Keep the header for big bodies (bundle parts), where an early refusal saves sending
    megabytes; small ones go in one exchange."""
    from botocore import handlers

    def expect_if_big(model: Any, params: dict[str, Any], **kwargs: Any) -> None:
        handlers.add_expect_header(model, params, **kwargs)
        body = params.get("body")
        if params.get("headers", {}).get("Expect") and body is not None:
            try:
                from botocore.utils import determine_content_length

                size = determine_content_length(body)
            except Exception:  # noqa: BLE001 - unknown size: keep the header
                return
            if size is not None and size < SMALL_PUT:
                del params["headers"]["Expect"]

    client.meta.events.unregister("before-call.s3", handlers.add_expect_header)
    client.meta.events.register("before-call.s3", expect_if_big)


def store_for(cfg: Config) -> Store:
    return Store(cfg.s3, cfg.app, config_path=cfg.path)
