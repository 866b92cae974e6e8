"""fabdeploy/adapters/store.py against moto's S3 server (the session fixture `s3_server`:
a real HTTP process, so If-Match/If-None-Match are S3's conditional writes, not mocks).

Hostile objects in the bucket (anyone with write access to it can put them there) must
give one clear line or be replaceable, never a traceback.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from fabdeploy.adapters.bundle import Bundle, publish_bundle
from fabdeploy.adapters.store import Lock, Pointer, Store, StoreError, local_identity

NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture
def store(moto_store: Store) -> Store:
    return moto_store


def put(store: Store, key: str, body: bytes) -> None:
    store.client.put_object(Bucket=store.s3.bucket, Key=key, Body=body)


def pointer_body(**over: Any) -> bytes:
    base = {
        "key": "k",
        "commit": "a" * 40,
        "sha256": "s" * 64,
        "ref": "main",
        "size": 1,
        "published_by": "ann@a",
        "published_at": "2024-01-01T00:00:00Z",
    }
    text = json.dumps(base)[:-1]
    return (text + "".join(f', "{k}": {v}' for k, v in over.items()) + "}").encode()


def bundle(store: Store, commit: str = "b" * 40) -> Bundle:
    key = store.bundle_key(commit)
    return Bundle(
        commit, "main", "f" * 64, 10, key, store.uri(key), uploaded=True, committed_at=1700000000
    )


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


# --- pointer (issue 13 §2.8) ---------------------------------------------------------------

HOSTILE_POINTERS = [
    pointer_body(committed_at="Infinity"),
    pointer_body(committed_at="NaN"),
    pointer_body(committed_at="1e999"),
    pointer_body(committed_at="1" + "0" * 40),
    pointer_body(size="1e999"),
    NESTED,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
]


@pytest.mark.parametrize("body", HOSTILE_POINTERS, ids=range(len(HOSTILE_POINTERS)))
def test_malformed_pointer_is_one_line_and_replaceable(
    store: Store, body: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    put(store, store.pointer_key, body)
    with pytest.raises(StoreError) as e:
        store.read_pointer()
    assert one_line(e).startswith(store.uri(store.pointer_key))
    # publish over it: a warning, then the conditional write replaces it
    p = publish_bundle(store, bundle(store), log=lambda line: None)
    assert store.read_pointer()[0] == p
    assert "replacing a corrupt pointer" in capsys.readouterr().err


def test_pointer_json_rejects_non_finite_numbers() -> None:
    for body in (pointer_body(published_at="NaN"), pointer_body(size="Infinity")):
        with pytest.raises(StoreError, match="re-publish"):
            Pointer.from_json(body, "s3://b/p")


# --- lock (issue 13 §2.6) --------------------------------------------------------------------

HOSTILE_LOCKS = [
    b"{oops",
    NESTED,
    b'{"holder": "ann@a", "action": "roll", "created_at": NaN, "expires_at": 1e999}',
    b'{"holder": "ann@a", "action": "roll", "created_at": 1, "expires_at": 1' + b"0" * 400 + b"}",
    b'{"holder": {"x": [1]}, "action": "roll", "created_at": 1, "expires_at": 2}',
    # the holder names this machine, so a pid out of range would reach os.kill
    (
        f'{{"holder": "ann@{socket.gethostname()}", "action": "roll", "created_at": 1, "expires_at": 2, '
        '"pid": 99999999999999999999}'
    ).encode(),
    b"[1, 2]",
]


@pytest.mark.parametrize("body", HOSTILE_LOCKS, ids=range(len(HOSTILE_LOCKS)))
def test_unparsable_lock_is_one_line_and_force_removes_it(store: Store, body: bytes) -> None:
    put(store, store.lock_key, body)
    with pytest.raises(StoreError) as e:
        store.acquire_lock("bob@b", "roll", expiry=60)
    assert "fab deploy.unlock" in one_line(e)
    try:
        lock = store.read_lock()
    except StoreError as e:
        assert "\n" not in str(e) and "fab deploy.unlock --force" in str(e)
        with pytest.raises(StoreError):
            store.break_lock()  # without --force it stays
    else:
        # Readable after all (a pid out of range is just dropped): it must still describe itself.
        assert lock is not None and lock.pid is None and lock.describe()
    removed = store.break_lock(force=True)
    assert removed is not None
    assert store.read_lock() is None


def test_force_does_not_remove_a_lock_replaced_meanwhile(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forced delete is conditional on the ETag read, even for an unreadable lock."""
    put(store, store.lock_key, b"{oops")
    real_get = store._get

    def get_then_replace(key: str, action: str) -> Any:
        got = real_get(key, action)
        put(store, store.lock_key, Lock("cat@c", "roll", 1.0, 2.0).to_json())
        return got

    monkeypatch.setattr(store, "_get", get_then_replace)
    with pytest.raises(StoreError, match="changed while breaking it"):
        store.break_lock(force=True)
    monkeypatch.undo()
    held = store.read_lock()
    assert held is not None and held.holder == "cat@c"


# --- dead local holders (issue 13 §2.5) -------------------------------------------------------


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def lock_from(store: Store, **fields: Any) -> None:
    now = time.time()
    body = {
        "holder": f"ann@{socket.gethostname()}",
        "action": "roll",
        "created_at": now,
        "expires_at": now + 600,
        "pid": dead_pid(),
        **fields,
    }
    put(store, store.lock_key, json.dumps(body).encode())


def test_lock_records_machine_boot_and_pid_namespace(store: Store) -> None:
    lock = store.acquire_lock("ann@a", "roll", expiry=60)
    raw = json.loads(
        store.client.get_object(Bucket=store.s3.bucket, Key=store.lock_key)["Body"].read()
    )
    assert (
        (raw["machine_id"], raw["boot_id"], raw["pidns"]) == local_identity() != (None, None, None)
    )
    assert store.read_lock() == lock


@pytest.mark.parametrize(
    "other",
    [
        {},  # an old lock: no identity recorded, only the hostname matches
        {"machine_id": "another-machine"},  # a cloned VM / CI runner with the same hostname
        {"boot_id": "an-earlier-boot"},
        {"pidns": "pid:[1]"},  # a container on the same kernel: same boot id, its own pids
    ],
)
def test_same_hostname_elsewhere_is_not_a_dead_local_holder(
    store: Store, other: dict[str, str]
) -> None:
    machine_id, boot_id, pidns = local_identity()
    fields = {"machine_id": machine_id, "boot_id": boot_id, "pidns": pidns} if other else {}
    lock_from(store, **{**fields, **other})
    with pytest.raises(StoreError) as e:
        store.acquire_lock("bob@b", "roll", expiry=60)
    assert one_line(e).startswith(f"deploy lock held by ann@{socket.gethostname()} (roll)")
    assert store.read_lock().holder.startswith("ann@")  # type: ignore[union-attr]


def test_dead_holder_on_this_machine_and_boot_is_broken(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    machine_id, boot_id, pidns = local_identity()
    lock_from(store, machine_id=machine_id, boot_id=boot_id, pidns=pidns)
    mine = store.acquire_lock("bob@b", "roll", expiry=60)
    assert store.read_lock() == mine
    assert "no longer runs on this machine" in capsys.readouterr().err


def test_unlock_breaks_a_dead_local_holders_lock_before_it_expires(store: Store) -> None:
    """`fab deploy.unlock` after a kill -9 here: no --force needed; another machine's still needs it."""
    machine_id, boot_id, pidns = local_identity()
    lock_from(store, machine_id=machine_id, boot_id=boot_id, pidns=pidns)
    held = store.break_lock()
    assert held is not None and held.holder.startswith("ann@") and store.read_lock() is None
    lock_from(store, machine_id="another-machine", boot_id=boot_id, pidns=pidns)
    with pytest.raises(StoreError, match="has not expired"):
        store.break_lock()


def test_identity_fields_are_bounded_strings() -> None:
    body = b'{"holder": "a@b", "action": "r", "created_at": 1, "expires_at": 2, "machine_id": {"x": 1}, "boot_id": 7}'
    lock = Lock.from_json(body, "s3://b/lock.json", None)
    assert (lock.machine_id, lock.boot_id, lock.pidns) == (None, None, None)
    assert not lock.dead_local_holder
