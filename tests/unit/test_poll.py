"""The one poll loop."""

from __future__ import annotations

from fabdeploy.basics.poll import poll


def test_done_at_once_costs_no_sleep() -> None:
    slept: list[float] = []
    r = poll(lambda: (True, "up"), timeout=10, interval=1, sleep=slept.append)
    assert r.done and r.last == "up" and slept == []


def test_backs_off_from_first_to_interval_and_reports_the_last_answer() -> None:
    answers = iter([(False, "a"), (False, "b"), (False, "c"), (False, "d"), (True, "e")])
    slept: list[float] = []
    r = poll(lambda: next(answers), timeout=60, interval=0.04, first=0.01, sleep=slept.append)
    assert r.done and r.last == "e" and slept == [0.01, 0.02, 0.04, 0.04]


def test_timeout_returns_the_last_answer_not_done() -> None:
    r = poll(lambda: (False, "still starting"), timeout=0.05, interval=0.01)
    assert not r.done and r.last == "still starting" and r.seconds >= 0.05
