"""The audit log file: durable appends, rotation by size, forgiving read-back, and kill -9 mid-stream."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from bgproxy.control.audit import AuditLog, AuditLogError, audit_event, switch_event
from bgproxy.core.switchboard import SwitchEvent
from bgproxy.core.timefmt import rfc3339
from bgproxy.core.weights import Weights

ROOT = Path(__file__).parent.parent


def ev(n: int, kind: str = "switch", **fields: Any) -> dict[str, Any]:
    return audit_event(kind, at=1714564800.0 + n, actor="ops", reason=f"change {n}", n=n, **fields)


def ns(events: list[dict[str, Any]]) -> list[int]:
    return [e["n"] for e in events]


def audit_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bgproxy.audit"]


@pytest.fixture
def quiet(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    monkeypatch.setattr(logging.getLogger("bgproxy"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="bgproxy.audit")
    return caplog


def test_append_then_load_round_trips_as_one_json_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with AuditLog(path) as audit:
        assert audit.load() == []  # no file yet: an empty log, and load does not create it
        assert not path.exists()
        first = ev(1, reason_detail="naïve \u2028 \ud800")  # non-ASCII and a lone surrogate survive
        audit.append(first)
        audit.append(ev(2, "pool", color="green", upstream="10.0.0.5:8080", op="add"))
        assert audit.events() == [first, ev(2, "pool", color="green", upstream="10.0.0.5:8080", op="add")]
        assert audit.load() == audit.events()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert [json.loads(line) for line in lines[:-1]] == AuditLog(path).load()
    assert lines[0].startswith(b'{"time":"2024-05-01T12:00:01.000000Z","kind":"switch","actor":"ops"')
    assert path.stat().st_mode & 0o777 == 0o600


def test_events_survive_a_new_audit_log_on_the_same_path(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with AuditLog(path) as audit:
        for n in range(5):
            audit.append(ev(n))
    again = AuditLog(path)
    assert ns(again.load()) == [0, 1, 2, 3, 4]
    again.append(ev(5))
    assert ns(again.events()) == [0, 1, 2, 3, 4, 5]
    assert ns(AuditLog(path).load()) == [0, 1, 2, 3, 4, 5]


def test_memory_is_what_a_restart_reads_not_the_callers_dict(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "events.jsonl")
    event = ev(1, weights=(10, 90))
    audit.append(event)
    event["reason"] = "changed afterwards"
    assert audit.events() == AuditLog(audit.path).load()
    assert audit.events()[0]["weights"] == [10, 90]
    assert audit.events()[0]["reason"] == "change 1"


def test_switch_event_has_the_fields_of_get_v1_events(tmp_path: Path) -> None:
    change = SwitchEvent(7, 1714564800.5, Weights(100, 0), Weights(0, 100), "deployer", None)
    assert switch_event(change) == {
        "time": rfc3339(1714564800.5),
        "kind": "switch",
        "actor": "deployer",
        "reason": None,
        "version": 7,
        "from_weights": {"blue": 100, "green": 0},
        "to_weights": {"blue": 0, "green": 100},
    }
    audit = AuditLog(tmp_path / "events.jsonl")
    audit.append(switch_event(change))
    assert AuditLog(audit.path).load() == [switch_event(change)]


def test_rotation_at_max_bytes_keeps_keep_old_files_and_drops_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    size = len(json.dumps(ev(10), separators=(",", ":"))) + 1
    audit = AuditLog(path, max_bytes=2 * size, keep=2)  # two events a file
    for n in range(10, 17):  # 7 events: files of [10 11] [12 13] [14 15] [16]; the first is dropped
        audit.append(ev(n))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    names = ("events.jsonl.2", "events.jsonl.1", "events.jsonl")
    on_disk = {
        name: ns([json.loads(x) for x in (tmp_path / name).read_text().splitlines()]) for name in names
    }
    assert on_disk == {"events.jsonl.2": [12, 13], "events.jsonl.1": [14, 15], "events.jsonl": [16]}
    assert all((tmp_path / name).stat().st_size <= 2 * size for name in on_disk)
    assert ns(AuditLog(path, keep=2).load()) == [12, 13, 14, 15, 16]


def test_keep_zero_starts_the_file_afresh_and_a_smaller_keep_removes_the_extras(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    size = len(json.dumps(ev(10), separators=(",", ":"))) + 1
    wide = AuditLog(path, max_bytes=size, keep=4)
    for n in range(10, 15):
        wide.append(ev(n))
    assert len(list(tmp_path.iterdir())) == 5
    wide.close()
    narrow = AuditLog(path, max_bytes=size, keep=1)
    narrow.append(ev(15))  # rotates: .2 .. .4 are beyond keep now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "events.jsonl.1"]
    assert ns(narrow.load()) == [14, 15]
    none = AuditLog(path, max_bytes=size, keep=0)
    none.append(ev(16))
    assert ns(none.load()) == [16]


def test_a_line_longer_than_max_bytes_is_still_written_alone(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    audit = AuditLog(path, max_bytes=200, keep=3)
    audit.append(ev(1))
    audit.append(ev(2, note="x" * 500))  # rotates ev 1 away, then writes the big one anyway
    audit.append(ev(3))  # the big one's file is over the limit: rotate again
    assert ns(AuditLog(path).load()) == [1, 2, 3]
    assert ns([json.loads((tmp_path / "events.jsonl.1").read_text())]) == [2]


def test_load_reads_across_rotated_files_in_order_and_caps_at_memory(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    for n, name in enumerate(["events.jsonl.3", "events.jsonl.2", "events.jsonl.1", "events.jsonl"]):
        (tmp_path / name).write_text("".join(json.dumps(ev(10 * n + i)) + "\n" for i in range(3)))
    (tmp_path / "events.jsonl.4").write_text(json.dumps(ev(-1)) + "\n")  # beyond keep: not read
    assert ns(AuditLog(path).load()) == [0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32]
    capped = AuditLog(path, memory=4)
    assert ns(capped.load()) == [22, 30, 31, 32]
    capped.append(ev(33))
    assert ns(capped.events()) == [30, 31, 32, 33]
    (tmp_path / "events.jsonl.2").unlink()  # a gap (crash mid-rotation) still reads in order
    assert ns(AuditLog(path).load()) == [0, 1, 2, 20, 21, 22, 30, 31, 32, 33]
    assert AuditLog(path, memory=0).load() == []


def test_a_torn_last_line_is_skipped_with_a_warning_and_the_next_append_starts_a_fresh_line(
    tmp_path: Path, quiet: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.jsonl"
    whole = json.dumps(ev(1), separators=(",", ":"))
    path.write_text(whole + "\n" + whole[: len(whole) // 2])  # kill -9 mid-write: no "\n"
    audit = AuditLog(path)
    assert ns(audit.load()) == [1]
    assert len(audit_warnings(quiet)) == 1
    [warning] = audit_warnings(quiet)
    assert str(path) in warning
    assert "torn last line 2" in warning
    audit.append(ev(2))
    audit.append(ev(3))
    quiet.clear()
    assert ns(AuditLog(path).load()) == [1, 2, 3]  # ev 2 was not glued onto the torn half
    [again] = audit_warnings(quiet)  # the torn half is kept for the record, now a whole bad line
    assert "line 2 skipped" in again
    assert path.read_text().splitlines()[1] == whole[: len(whole) // 2]


def test_a_complete_last_event_without_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(ev(1)))
    audit = AuditLog(path)
    assert ns(audit.load()) == [1]
    audit.append(ev(2))
    assert ns(AuditLog(path).load()) == [1, 2]


def test_bad_lines_in_the_middle_are_skipped_each_with_a_warning(
    tmp_path: Path, quiet: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.jsonl"
    good = [json.dumps(ev(n)) for n in range(3)]
    bad = [
        "garbage{",
        "[1, 2]",
        json.dumps({"time": "yesterday", "kind": "switch", "actor": "a", "reason": None}),
        json.dumps({"kind": "switch", "actor": "a", "reason": None}),
        '{"time": "2024-05-01T12:00:00Z", "kind": "x", "actor": "a", "reason": null, "n": NaN}',
    ]
    body = "\n".join([good[0], *bad, good[1], "", good[2]]) + "\n"
    path.write_bytes(body.encode() + b"\xff\xfe not utf-8\n")
    assert ns(AuditLog(path).load()) == [0, 1, 2]
    warned = audit_warnings(quiet)
    assert [w.split(": line ")[1].split(" ")[0] for w in warned] == ["2", "3", "4", "5", "6", "10"]
    assert all(w.startswith(f"audit log {path}: line ") for w in warned)
    assert "missing key 'time'" in warned[3]
    assert "not UTF-8" in warned[5]


def test_malformed_events_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "events.jsonl")
    with pytest.raises(ValueError, match="missing key 'reason'"):
        audit.append({"time": rfc3339(0), "kind": "switch", "actor": "a"})
    with pytest.raises(ValueError, match="kind must be"):
        audit.append({"time": rfc3339(0), "kind": "", "actor": "a", "reason": None})
    with pytest.raises(ValueError, match="not JSON"):
        audit.append(ev(1, value=float("nan")))
    with pytest.raises(ValueError, match="not JSON"):
        audit.append(ev(1, value=object()))
    with pytest.raises(TypeError):
        audit_event("switch", at=0, actor="a", reason=None, time="now")
    assert audit.events() == []
    assert not audit.path.exists()
    with pytest.raises(ValueError, match="max_bytes"):
        AuditLog(audit.path, max_bytes=0)
    with pytest.raises(ValueError, match="keep"):
        AuditLog(audit.path, keep=-1)


def test_an_unwritable_path_raises_naming_the_file_and_keeps_memory_as_the_file(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    path = tmp_path / "not-a-dir" / "events.jsonl"
    audit = AuditLog(path)
    with pytest.raises(AuditLogError, match=f"audit log {path}: cannot write it") as raised:
        audit.append(ev(1))
    assert raised.value.path == path
    assert audit.events() == []  # not written, so not shown
    with pytest.raises(AuditLogError, match=f"audit log {path}: cannot open it for appending"):
        audit.open()


def test_a_write_cut_short_by_a_full_disk_raises_and_the_next_event_gets_its_own_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.jsonl"
    audit = AuditLog(path)
    audit.append(ev(1))
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        monkeypatch.setattr(os, "write", real_write)
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(AuditLogError, match=f"audit log {path}: cannot write it: No space left on device"):
        audit.append(ev(2))
    assert ns(audit.events()) == [1]
    audit.append(ev(3))
    assert ns(audit.events()) == [1, 3]
    assert ns(AuditLog(path).load()) == [1, 3]
    [warning] = audit_warnings(quiet)
    assert "line 2 skipped" in warning


def test_an_unreadable_file_fails_the_load_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.with_name("events.jsonl.1").mkdir()  # reading a directory fails even as root
    with pytest.raises(AuditLogError, match=r"audit log .*events\.jsonl\.1: cannot read it"):
        AuditLog(path).load()


def test_a_closed_log_refuses_appends(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "events.jsonl")
    audit.append(ev(1))
    audit.close()
    audit.close()
    with pytest.raises(AuditLogError, match="is closed"):
        audit.append(ev(2))
    assert ns(audit.events()) == [1]


def test_a_file_rotated_or_removed_by_someone_else_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    audit = AuditLog(path)
    audit.append(ev(1))
    path.rename(path.with_name("events.jsonl.1"))  # another bgproxy (takeover) rotated it
    audit.append(ev(2))
    path.unlink()
    audit.append(ev(3))
    assert ns(AuditLog(path).load()) == [1, 3]


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from bgproxy.control.audit import AuditLog, audit_event

    audit = AuditLog(Path(sys.argv[1]), max_bytes=3000, keep=3, memory=0)
    n = 0
    while True:
        audit.append(audit_event("switch", at=1714564800.0, actor="child", reason="x" * (n % 97), n=n))
        n += 1
    """
)


def test_kill_9_mid_stream_leaves_only_complete_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 10
        while not path.with_name("events.jsonl.1").exists():  # it has written and rotated
            assert child.poll() is None, "the writer exited early"
            assert time.monotonic() < deadline, "the writer never rotated"
            time.sleep(0.01)
        time.sleep(0.3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(5)
    assert child.returncode == -signal.SIGKILL
    audit = AuditLog(path, keep=3, memory=1_000_000)
    loaded = audit.load()  # does not raise, whatever the kill cut
    assert len(loaded) > 10
    assert all(e["actor"] == "child" and e["reason"] == "x" * (e["n"] % 97) for e in loaded)
    numbers = ns(loaded)
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # in order, no gap
    audit.append(ev(-1))
    assert AuditLog(path, keep=3, memory=1_000_000).load()[-1] == ev(-1)
