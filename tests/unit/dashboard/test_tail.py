"""StatsTail reads what training appends, waits for the file and for unfinished lines, and starts over on a restart."""

import json

import pytest

from moe_lightning.dashboard import StatsTail


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
