"""Signed releases with SSH signatures (`ssh-keygen -Y`): no crypto of our own.

Two signed documents, each an *envelope* `{"payload": "<JSON text>", "signature": "<armored
SSH signature>"}` so the exact signed bytes travel with their signature:

- the **manifest** of a bundle (namespace `fabdeploy-manifest`), signed when the bundle is
  built: app, bundle key, commit, sha256, size, built at/by;
- the **pointer** (namespace `fabdeploy-pointer`), signed at every publish: the manifest
  envelope, a sequence number one above the pointer it replaces, who and when.

Nodes verify both against the trusted signers `deploy.setup` installs, before they download
anything. The deploying machine verifies with the same file, and never trusts S3 metadata.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from fabdeploy.basics.config import Config
from fabdeploy.basics.errors import SigningError

NS_MANIFEST = "fabdeploy-manifest"
NS_POINTER = "fabdeploy-pointer"
KEYGEN = "ssh-keygen"


def payload_text(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def _keygen(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run([KEYGEN, *args], input=stdin, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise SigningError(
            f"{KEYGEN} not found: install openssh-client (OpenSSH 8.2 or newer)"
        ) from None


def sign(cfg: Config, payload: dict[str, Any], namespace: str) -> dict[str, str]:
    """An envelope of `payload` signed with signing.key (a private key, or a .pub whose key is in the agent)."""
    key = cfg.signing.key
    if key is None:
        raise SigningError(
            f"signing.key is not set in {cfg.path}: name the deployer's SSH key to sign with"
        )
    if not key.exists():
        raise SigningError(f"signing.key {key} does not exist (signing.key in {cfg.path})")
    text = payload_text(payload)
    with tempfile.TemporaryDirectory(prefix="fabdeploy-sign-") as tmp:
        msg = Path(tmp) / "payload"
        msg.write_text(text)
        r = _keygen("-Y", "sign", "-f", str(key), "-n", namespace, str(msg))
        sig = msg.with_name("payload.sig")
        if r.returncode != 0 or not sig.exists():
            why = (r.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise SigningError(
                f"signing with {key} failed: {why} (is the key's passphrase in ssh-agent?)"
            )
        return {"payload": text, "signature": sig.read_text()}


def verify(cfg: Config, envelope: Any, namespace: str, what: str) -> tuple[dict[str, Any], str]:
    """The payload of a signed envelope and the principal that signed it, or SigningError."""
    signers = cfg.signing.allowed_signers
    if signers is None:
        raise SigningError(
            f"{what}: cannot verify signatures: signing.allowed_signers is not set in {cfg.path}"
        )
    return verify_with(signers, envelope, namespace, what)


def verify_with(
    signers: Path, envelope: Any, namespace: str, what: str
) -> tuple[dict[str, Any], str]:
    if not (
        isinstance(envelope, dict)
        and isinstance(envelope.get("payload"), str)
        and isinstance(envelope.get("signature"), str)
    ):
        raise SigningError(f"{what} is not signed")
    text, signature = envelope["payload"], envelope["signature"]
    with tempfile.TemporaryDirectory(prefix="fabdeploy-verify-") as tmp:
        sig = Path(tmp) / "sig"
        sig.write_text(signature)
        found = _keygen("-Y", "find-principals", "-s", str(sig), "-f", str(signers))
        principals = found.stdout.decode(errors="replace").split()
        if found.returncode != 0 or not principals:
            raise SigningError(f"{what} is signed by a key that is not in {signers}: refusing it")
        principal = principals[0]
        ok = _keygen(
            "-Y",
            "verify",
            "-f",
            str(signers),
            "-I",
            principal,
            "-n",
            namespace,
            "-s",
            str(sig),
            stdin=text.encode(),
        )
        if ok.returncode != 0:
            raise SigningError(
                f"{what}: the signature of {principal} does not match its content: "
                "it was changed after signing; refusing it"
            )
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise SigningError(f"{what}: the signed payload is not a JSON object")
    return payload, principal


def key_fingerprint(key: Path) -> str:
    r = _keygen("-l", "-f", str(key))
    return r.stdout.decode(errors="replace").split()[1] if r.returncode == 0 else str(key)


def signers_text(cfg: Config) -> bytes | None:
    """The trusted signers file that setup installs on every node, or None when not configured."""
    path = cfg.signing.allowed_signers
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigningError(f"signing.allowed_signers {path} cannot be read: {e.strerror}") from None
    if not data.strip():
        raise SigningError(
            f"signing.allowed_signers {path} is empty: list each trusted deployer's public key"
        )
    return data if data.endswith(b"\n") else data + b"\n"
