"""Webhook notifications (adapters/notify.py, ops/events.py) against a real local HTTP
receiver: what is posted, one retry, the per-event filter, and that nothing waits past the bound."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from webhook_receiver import Receiver

from fabdeploy.adapters.notify import Notifier, safe_url
from fabdeploy.basics.config import Webhook, _build
from fabdeploy.basics.errors import ConfigError, DeployError
from fabdeploy.ops import events
from fabdeploy.ops.events import deploy_run
from fabdeploy.ops.targets import Targets


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def notifier(
    url: str, events: tuple[str, ...] | None = None, timeout: float = 5
) -> tuple[Notifier, list[str]]:
    said: list[str] = []
    hook = Webhook(url) if events is None else Webhook(url, events)
    return Notifier((hook,), timeout, say=said.append), said


def test_posts_json_in_order_and_only_the_events_asked_for(receiver: Receiver) -> None:
    said: list[str] = []
    n = Notifier(
        (Webhook(receiver.url), Webhook(receiver.url + "/failures", ("failure",))),
        5,
        say=said.append,
    )
    for event in ("start", "success", "failure"):
        n.post(event, {"text": event})
    n.close()
    assert said == []
    mine = [p["text"] for p in receiver.posts if p["path"].endswith("/SECRET")]
    assert mine == ["start", "success", "failure"]  # one URL: in the order posted
    assert [p["text"] for p in receiver.posts if p["path"].endswith("/failures")] == ["failure"]
    assert {p["type"] for p in receiver.posts} == {"application/json"}


def test_one_retry_then_one_warning_without_the_secret_path(receiver: Receiver) -> None:
    receiver.mode = "fail-once"
    n, said = notifier(receiver.url)
    n.post("start", {"text": "hi"})
    n.close()
    assert receiver.requests == 2 and [p["text"] for p in receiver.posts] == ["hi"] and said == []
    receiver.mode, receiver.requests = "fail", 0
    n, said = notifier(receiver.url)
    n.post("failure", {"text": "hi"})
    n.close()
    assert receiver.requests == 2  # the post and its one retry
    assert said == [
        f"notification (failure) to http://127.0.0.1:{receiver.server.server_port}/… failed twice: HTTP 500"
    ]
    assert "SECRET" not in said[0]


def test_a_hung_receiver_delays_nothing_past_the_bound(receiver: Receiver) -> None:
    receiver.mode = "hang"
    n, said = notifier(receiver.url, timeout=0.5)
    t0 = time.monotonic()
    n.post("start", {"text": "a"})
    n.post("success", {"text": "b"})
    posted = time.monotonic() - t0
    receiver.wait_requests(1)
    n.close()
    waited = time.monotonic() - t0
    assert posted < 0.5  # posting never waits for the network
    assert waited < 0.5 + 2.0  # close waits at most the bound (plus scheduling on a busy box)
    assert len(said) == 1 and "2 notifications still in flight after 0.5s" in said[0]


def test_a_refused_connection_is_one_warning(receiver: Receiver) -> None:
    url = receiver.url
    receiver.close()
    n, said = notifier(url, timeout=1)
    n.post("start", {"text": "x"})
    n.close(wait=5)
    assert len(said) == 1 and "failed twice: ConnectionRefusedError" in said[0], said


def test_urls_from_the_environment(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_HOOK", receiver.url)
    n, said = notifier("${SLACK_HOOK}")
    n.post("start", {"text": "from env"})
    monkeypatch.delenv("SLACK_HOOK")
    n.post("success", {"text": "unset now"})
    n.close()
    assert [p["text"] for p in receiver.posts] == ["from env"]
    assert said == ["notification (success) not sent: ${SLACK_HOOK} is not set"]
    assert safe_url("https://hooks.slack.com/services/T0/B0/XYZ") == "https://hooks.slack.com/…"


# --- deploy.yml and the deploy's posts ----------------------------------------------------------


def cfg_with(tmp_path: Path, notify: Any, **extra: Any) -> Any:
    data = {
        "app": "shop",
        "repo": str(tmp_path),
        "s3": {"bucket": "b"},
        "deploy_to": "/srv/shop",
        "hosts": ["web1", "web2"],
        "notify": notify,
        **extra,
    }
    return _build(data, tmp_path / "deploy.yml")


@pytest.mark.parametrize(
    ("notify", "msg"),
    [
        ({"webhooks": ["ftp://x"]}, "http(s):// URLs"),
        ({"webhooks": [{"url": "https://x", "events": ["deployed"]}]}, "not deployed"),
        ({"webhooks": [{"url": "https://x", "channel": "#ops"}]}, "url, events only"),
        ({"timeout": 0}, "notify.timeout must be a number > 0"),
    ],
)
def test_bad_notify_settings_are_one_line(tmp_path: Path, notify: Any, msg: str) -> None:
    with pytest.raises(ConfigError, match="notify") as e:
        cfg_with(tmp_path, notify)
    assert msg in str(e.value) and "\n" not in str(e.value)


class B:
    commit, ref, bundle_id = (
        "0123456789abcdef" * 2 + "01234567",
        "main",
        "0123456789abcdef" * 2 + "01234567",
    )


def test_a_deploy_posts_start_then_its_outcome_with_what_happened(
    tmp_path: Path, receiver: Receiver
) -> None:
    cfg = cfg_with(tmp_path, {"webhooks": [receiver.url], "timeout": 5})
    targets = Targets(list(cfg.hosts), True)
    with deploy_run(cfg, "hotfix", targets) as run:
        run.bundle(B)
        run.counts.ok, run.counts.unchanged = 1, 1
        run.ok = True
    start, done = receiver.posts
    assert start["fabdeploy"]["event"] == "start" and start["fabdeploy"]["counts"] is None
    assert start["text"] == f"shop: {run.user} started a hotfix on 2 hosts"  # no git repo here
    f = done["fabdeploy"]
    assert f["event"] == "success" and f["task"] == "hotfix" and f["app"] == "shop"
    assert (f["commit"], f["ref"], f["bundle_id"], f["user"]) == (
        B.commit,
        "main",
        B.bundle_id,
        run.user,
    )
    assert f["counts"] == {"ok": 1, "unchanged": 1, "failed": 0, "not_touched": 0}
    assert f["hosts"] == ["web1", "web2"] and f["seconds"] >= 0 and f["error"] is None
    assert done["text"].startswith(f"shop: hotfix of 01234567 (main) by {run.user} succeeded in ")
    assert done["text"].endswith(": 1 ok, 0 failed, 1 unchanged")


def test_a_failed_deploy_posts_failure_with_its_error_escaped_for_slack(
    tmp_path: Path, receiver: Receiver
) -> None:
    cfg = cfg_with(tmp_path, {"webhooks": [{"url": receiver.url, "events": ["failure"]}]})
    cfg = dataclasses.replace(cfg, stage="production")
    with pytest.raises(DeployError):
        with deploy_run(cfg, "rollback") as run:
            raise DeployError("the deploy lock is held by <alice> & co")
    (post,) = receiver.posts
    assert post["fabdeploy"]["event"] == "failure" and post["fabdeploy"]["stage"] == "production"
    assert post["fabdeploy"]["error"] == "the deploy lock is held by <alice> & co"
    assert post["text"].startswith(f"shop (production): rollback by {run.user} FAILED after ")
    assert post["text"].endswith("(the deploy lock is held by &lt;alice&gt; &amp; co)")


def test_a_dry_run_posts_nothing(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Any] = []
    monkeypatch.setattr(events, "Notifier", lambda *a, **k: made.append(a))
    cfg = cfg_with(tmp_path, {"webhooks": [receiver.url]})
    with deploy_run(cfg, "roll", dry_run=True) as run:
        run.ok = True
    assert made == [] and receiver.requests == 0  # no sender was even started
