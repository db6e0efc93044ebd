"""The Watermark on its own: pure, no I/O."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from connectors.base import MAX_SEEN, Watermark, holds_fetch_failures

T0 = datetime(2024, 4, 10, 12, 0, tzinfo=UTC)
LAG = timedelta(minutes=10)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_advance_moves_the_value_and_since_lags_behind():
    wm = Watermark.read(None, key="when", lag=LAG)
    assert wm.value is None and wm.since is None
    wm.advance("a", 1, at(5))
    wm.advance("b", 3, at(2))  # out of order: the value is the highest read
    assert wm.value == at(5) and wm.since == at(-5)
    assert wm.result().to_json()["when"] == at(5).isoformat()


def test_round_trip_through_json_with_a_version():
    wm = Watermark.read(None, key="updated", lag=LAG, timespec="milliseconds")
    wm.advance("PLAT-1", 1712750712345, at(0))
    data = json.loads(json.dumps(wm.result().to_json()))
    assert data["version"] == 1 and data["updated"] == "2024-04-10T12:00:00.000+00:00"
    again = Watermark.read(data, key="updated", lag=LAG, timespec="milliseconds")
    assert again.value == at(0) and again.is_known("PLAT-1", 1712750712345)
    assert again.to_json() == data


def test_newer_versions_are_refused():
    with pytest.raises(ValueError, match="unknown cursor version"):
        Watermark.read({"version": 99, "value": None})


@pytest.mark.parametrize("old, key, known", [
    ({"when": "2024-04-10T12:00:00+00:00", "seen": {"101": [4, "2024-04-10T11:55:00+00:00"]}},
     "when", ("101", 4)),  # Confluence
    ({"updated": "2024-04-10T12:00:00.000+00:00", "seen": {"PLAT-1": 1712750100000}},
     "updated", ("PLAT-1", 1712750100000)),  # Jira: the version is the epoch ms
    ("2024-04-10T12:00:00.000Z", "updated", None),  # GitLab issues / merge requests
])
def test_old_cursor_shapes_are_read(old, key, known):
    wm = Watermark.read(old, key=key, lag=LAG)
    assert wm.value == T0 and wm.since == at(-10)
    if known:
        assert wm.is_known(*known) and not wm.is_known(known[0], "other")


def test_known_items_skip_and_new_versions_do_not():
    wm = Watermark.read({"when": at(0).isoformat(), "seen": {"p": [2, at(-1).isoformat()]}},
                        key="when", lag=LAG)
    assert wm.is_known("p", 2) and not wm.is_known("p", 3) and not wm.is_known("q", 2)
    assert not wm.is_known("p", None)
    wm.advance("q", 1, at(3))
    assert wm.is_known("q", 1)  # read earlier in this same read


def test_a_failed_item_holds_the_cursor_and_later_keys_are_forgotten():
    wm = Watermark.read({"when": at(0).isoformat(), "seen": {}}, key="when", lag=LAG)
    wm.advance("a", 1, at(1))
    wm.hold_at(at(2))  # "b" failed at minute 2
    wm.advance("c", 1, at(3))
    done = wm.result()
    assert done.value == at(2)
    assert set(done.seen) == {"a"}  # "c" is after the hold: read again next time
    assert holds_fetch_failures(done.to_json())


def test_the_lowest_hold_wins_and_none_means_where_the_read_started():
    wm = Watermark.read({"when": at(0).isoformat()}, key="when", lag=LAG)
    wm.advance("a", 1, at(4))
    wm.hold_at(at(3))
    wm.hold_at(at(5))
    assert wm.result().value == at(3)
    wm.hold_at(None)
    assert wm.result().value == at(0)
    first = Watermark.read(None, key="when")
    first.hold_at(first.value)  # failed before anything was read
    first.advance("z", 1, at(9))
    assert first.result().value is None and first.result().seen == {}


def test_a_hold_with_nothing_read_stays_at_the_failed_item():
    wm = Watermark.read(None, key="updated")
    wm.hold_at(at(7))
    assert wm.result().value == at(7)


def test_hold_all_keeps_the_start():
    wm = Watermark.read("2024-04-10T12:00:00Z", key="updated", lag=LAG)
    wm.advance("x", "v", at(30))
    wm.hold_all()
    assert wm.result().value == T0


def test_prune_keeps_the_lag_window_and_at_most_max_seen():
    wm = Watermark.read(None, key="when", lag=LAG)
    wm.advance("old", 1, at(0))
    wm.advance("edge", 1, at(20))
    wm.advance("new", 1, at(30))
    wm.prune()
    assert set(wm.seen) == {"edge", "new"}
    many = Watermark.read(None, key="when", lag=timedelta(days=1))
    for n in range(MAX_SEEN + 10):
        many.advance(str(n), 1, at(n / 100))
    many.prune()
    assert len(many.seen) == MAX_SEEN and "0" not in many.seen and str(MAX_SEEN + 9) in many.seen


def test_prune_keeps_keys_down_to_the_hold():
    wm = Watermark.read(None, key="when", lag=LAG)
    wm.advance("a", 1, at(0))
    wm.hold_at(at(1))
    wm.advance("b", 1, at(60))
    wm.prune()
    assert "a" in wm.seen  # the hold is the floor, not the value


def test_a_checkpoint_restores_the_hold_and_keeps_the_known_keys():
    wm = Watermark.read({"when": at(0).isoformat(), "seen": {"k": [1, at(-1).isoformat()]}},
                        key="when", lag=LAG)
    wm.advance("a", 1, at(1))
    wm.hold_at(at(1))
    wm.advance("b", 1, at(2))
    state = json.loads(json.dumps(wm.to_json()))
    resumed = Watermark.read({"when": at(0).isoformat(), "seen": {"k": [1, at(-1).isoformat()]}},
                             key="when", lag=LAG).restore(state)
    assert resumed.held and resumed.result().value == at(1)
    assert resumed.is_known("k", 1) and resumed.origin == at(0)


def test_cursors_without_a_version_do_not_hold_failures():
    assert not holds_fetch_failures({"commit": "abc"})
    assert not holds_fetch_failures({"when": None, "seen": {}})
    assert not holds_fetch_failures(None)


def test_a_first_read_resumed_from_a_checkpoint_still_holds_at_nothing():
    wm = Watermark.read(None, key="updated")
    wm.advance("a", 1, at(1))
    resumed = Watermark.read(None, key="updated").restore(json.loads(json.dumps(wm.to_json())))
    assert resumed.origin is None and resumed.value == at(1)
    resumed.hold_all()  # e.g. the result set shifted: nothing of this read counts
    assert resumed.result().value is None
