"""StatsTail reads what training appends, waits for the file and for unfinished lines, and starts over on a restart."""

import json

import pytest

from moe_lightning.dashboard import StatsTail
from moe_lightning.dashboard.tail import TailCursor


def test_a_missing_run_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match="RUN_DIR '.*nope' is not a directory"):
        StatsTail(tmp_path / "nope")


def test_waits_for_the_file_then_reads_only_what_is_new(tmp_path, stats_lines):
    tail = StatsTail(tmp_path)
    assert tail.poll() == [] and tail.path is None
    path = tmp_path / "moe" / "version_0" / "router_stats.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(stats_lines[:2]))
    assert [r["step"] for r in tail.poll()] == [1, 2]
    assert tail.poll() == []
    with path.open("a") as file:
        file.write(stats_lines[2])
    assert [r["step"] for r in tail.poll()] == [3]
    assert [r["step"] for r in tail.records] == [1, 2, 3] and tail.path == path


def test_a_line_being_written_waits_for_its_newline(tmp_path, stats_lines):
    path = tmp_path / "router_stats.jsonl"
    line = stats_lines[0]
    path.write_text(line[:50])
    tail = StatsTail(tmp_path)
    assert tail.poll() == []
    with path.open("a") as file:
        file.write(line[50:])
    assert tail.poll() == [json.loads(line)]


def test_a_shrunk_file_is_read_again_from_the_start(tmp_path, stats_lines):
    path = tmp_path / "router_stats.jsonl"
    path.write_text("".join(stats_lines))
    tail = StatsTail(tmp_path)
    tail.poll()
    path.write_text(stats_lines[0])
    assert tail.poll() == [] and tail.records == [] and tail.generation == 1
    assert [r["step"] for r in tail.poll()] == [1]


def test_a_cursor_takes_each_record_once_and_everything_again_after_a_restart(tmp_path, alarm_lines):
    path = tmp_path / "alarms.jsonl"
    path.write_text("".join(alarm_lines[:3]))
    tail = StatsTail(tmp_path, "alarms.jsonl")
    cursor = TailCursor(tail)
    assert cursor.take() == (True, [])  # a new reader starts over, before anything was read
    tail.poll()
    reset, taken = cursor.take()
    assert not reset and [(a["step"], a["layer"]) for a in taken] == [(2, 0), (2, 1), (4, 0)]
    assert cursor.take() == (False, [])
    path.write_text(alarm_lines[0])  # shorter: the run restarted in place
    tail.poll()
    tail.poll()
    reset, taken = cursor.take()
    assert reset and [(a["step"], a["layer"]) for a in taken] == [(2, 0)]
