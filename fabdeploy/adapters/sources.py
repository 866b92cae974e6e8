"""Where linked files' content lives, as the deploying machine reads and writes it: SSM
parameters (SecureString), Secrets Manager secrets and S3 objects (deploy.yml's linked_files
entries with ssm:, secret: or s3:). The nodes read the same sources with their own copy of this
logic (node/node.py: fetch_shared_value); `fab deploy.config` shows, pushes and diffs them here.

Values are bytes and never leave this module as text in an error: messages name the source,
never its content. boto3 is imported lazily (`fab --list` imports the task module).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fabdeploy.adapters import boto
from fabdeploy.basics.config import Config, LinkedSource
from fabdeploy.basics.errors import DeployError

# SSM's standard tier holds 4 KB; above that the parameter needs a higher tier.
SSM_STANDARD_MAX = 4096
MAX_BYTES = 4 * 1024 * 1024  # the nodes' own bound (node.py: MAX_SHARED_BYTES)

_NEEDS = {
    "ssm": "ssm:GetParameter/ssm:PutParameter (and kms:Decrypt/kms:Encrypt on its key)",
    "secret": "secretsmanager:GetSecretValue/PutSecretValue/CreateSecret (and kms on its key)",
    "s3": "s3:GetObject/s3:PutObject",
}
_MISSING_CODES = {"ParameterNotFound", "ResourceNotFoundException", "NoSuchKey"}


class SourceError(DeployError):
    """A linked file's source could not be read or written; one line naming it."""


@dataclass(frozen=True)
class Stored:
    """A source's current value and what identifies it (never printed unless asked)."""

    data: bytes
    version: str  # SSM Version, the secret's VersionId, the object's VersionId or ETag
    modified: str  # ISO 8601 UTC, or "" when the service does not say


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return "" if value is None else str(value)


class Sources:
    """Read and write linked files' sources with the deploying machine's credentials."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        cs = cfg.config_sources
        self.region = cs.region or cfg.s3.region
        self.profile = cs.profile or cfg.s3.profile
        self.endpoints = {
            "ssm": cs.ssm_endpoint_url,
            "secretsmanager": cs.secretsmanager_endpoint_url,
            "s3": cfg.s3.endpoint_url,
        }
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _service(self, src: LinkedSource) -> str:
        return {"ssm": "ssm", "secret": "secretsmanager", "s3": "s3"}[src.kind]

    def client(self, service: str) -> Any:
        with self._lock:
            if service not in self._clients:
                self._clients[service] = self._make(service)
            return self._clients[service]

    def _make(self, service: str) -> Any:
        import boto3
        import botocore.config
        import botocore.exceptions

        try:
            session = boto3.Session(profile_name=self.profile, region_name=self.region)
        except botocore.exceptions.ProfileNotFound:
            raise SourceError(
                f"AWS profile {self.profile!r} (config_sources.profile or s3.profile) not found: "
                "create it or fix deploy.yml"
            ) from None
        region = session.region_name or ("us-east-1" if self.endpoints[service] else None)
        if region is None:
            raise SourceError(
                f"no AWS region for {service}: set config_sources.region (or s3.region) in "
                f"{self.cfg.path}"
            )
        conf = botocore.config.Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        return session.client(
            service, region_name=region, endpoint_url=self.endpoints[service], config=conf
        )

    def where(self, src: LinkedSource) -> str:
        endpoint = self.endpoints[self._service(src)]
        return endpoint or f"region {self.region or '(default)'}"

    def error(self, exc: BaseException, src: LinkedSource, action: str) -> SourceError:
        if isinstance(exc, SourceError):
            return exc
        f = boto.classify(exc)
        what = f"{action} {src.describe()}"
        if f.kind == boto.NO_CREDENTIALS:
            return SourceError(
                f"no AWS credentials found ({what}): set AWS_PROFILE/AWS_ACCESS_KEY_ID or "
                "config_sources.profile"
            )
        if f.kind in (boto.UNREACHABLE, boto.SLOW):
            return SourceError(
                f"cannot reach {self._service(src)} at {self.where(src)} ({what}): check the "
                "network, config_sources.region and the endpoint in deploy.yml"
            )
        if f.kind in (boto.DENIED, boto.BAD_CREDENTIALS) or f.code.startswith("KMS"):
            return SourceError(
                f"access denied ({f.code}) {what} at {self.where(src)}: the credentials need "
                f"{_NEEDS[src.kind]}"
            )
        return SourceError(
            f"{what} failed at {self.where(src)}: {f.code} {f.message}".rstrip()
            if f.code
            else f"{what} failed at {self.where(src)}: {f.message}"
        )

    def read(self, src: LinkedSource) -> Stored | None:
        """The source's value, or None when it does not exist yet."""
        try:
            c = self.client(self._service(src))
            if src.kind == "ssm":
                p = c.get_parameter(Name=src.name, WithDecryption=True)["Parameter"]
                return Stored(
                    str(p["Value"]).encode(),
                    str(p.get("Version", "")),
                    _iso(p.get("LastModifiedDate")),
                )
            if src.kind == "secret":
                r = c.get_secret_value(SecretId=src.name)
                raw = r.get("SecretBinary")
                data = bytes(raw) if raw is not None else str(r["SecretString"]).encode()
                return Stored(data, str(r.get("VersionId", "")), _iso(r.get("CreatedDate")))
            r = c.get_object(Bucket=src.bucket, Key=src.name)
            body = r["Body"]
            try:
                data = body.read(MAX_BYTES + 1)
            finally:
                body.close()
            if len(data) > MAX_BYTES:
                raise SourceError(
                    f"{src.describe()} is larger than {MAX_BYTES // (1024 * 1024)} MiB: nodes refuse "
                    "a linked file that big"
                )
            version = r.get("VersionId") or str(r.get("ETag", "")).strip('"')
            return Stored(data, str(version), _iso(r.get("LastModified")))
        except Exception as e:
            if not isinstance(e, SourceError) and boto.classify(e).code in _MISSING_CODES:
                return None
            raise self.error(e, src, "reading") from None

    def write(self, src: LinkedSource, data: bytes) -> str:
        """Store `data` as the source's new value; returns its new version."""
        if len(data) > MAX_BYTES:
            raise SourceError(
                f"{len(data)} bytes is more than nodes accept for a linked file (4 MiB)"
            )
        text: str | None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        try:
            c = self.client(self._service(src))
            if src.kind == "ssm":
                if text is None:
                    raise SourceError(
                        f"{src.describe()}: SSM parameters hold text and this file is not UTF-8; "
                        "use a secret: or s3: source for binary files"
                    )
                extra = {"Tier": "Intelligent-Tiering"} if len(data) > SSM_STANDARD_MAX else {}
                r = c.put_parameter(
                    Name=src.name, Value=text, Type="SecureString", Overwrite=True, **extra
                )
                return str(r.get("Version", ""))
            if src.kind == "secret":
                value = {"SecretString": text} if text is not None else {"SecretBinary": data}
                try:
                    r = c.put_secret_value(SecretId=src.name, **value)
                except Exception as e:
                    if boto.classify(e).code != "ResourceNotFoundException":
                        raise
                    r = c.create_secret(Name=src.name, **value)
                return str(r.get("VersionId", ""))
            import hashlib

            r = c.put_object(
                Bucket=src.bucket,
                Key=src.name,
                Body=data,
                Metadata={"sha256": hashlib.sha256(data).hexdigest()},
            )
            return str(r.get("VersionId") or str(r.get("ETag", "")).strip('"'))
        except Exception as e:
            raise self.error(e, src, "writing") from None
