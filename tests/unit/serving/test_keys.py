"""Key files: hashed keys written by ``moe-lightning serve add-key``, read back with their roles and rate limits;
every malformed file refused naming the file and the entry."""

import hashlib
import io
import json
import stat

import pytest

from moe_lightning.serving.cli import serve_main
from moe_lightning.serving.keys import ApiKeyRecord, RateLimit, add_key, load_api_keys, read_key_file
from moe_lightning.serving.roles import Role

LONG_KEY = "an-existing-key-of-some-length"


def test_add_key_prints_a_new_key_once_and_stores_only_its_hash(tmp_path, capsys):
    key_file = tmp_path / "keys.json"
    serve_main(["add-key", "--key-file", str(key_file), "--name", "alice", "--role", "user", "--role", "metrics",
                "--rate", "2.5", "--burst", "4"])
    printed = capsys.readouterr()
    key = printed.out.strip()
    assert key.startswith("mlk_") and len(key) > 40 and "shown once" in printed.err
    text = key_file.read_text()
    assert key not in text and key[4:] not in text
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert json.loads(text) == {"keys": [{"name": "alice", "sha256": hashlib.sha256(key.encode()).hexdigest(),
                                          "roles": ["metrics", "user"],
                                          "rate_limit": {"requests_per_second": 2.5, "burst": 4}}]}
    serve_main(["add-key", "--key-file", str(key_file), "--name", "bob", "--role", "admin"])
    second = capsys.readouterr().out.strip()
    assert second != key
    assert [(record.name, record.roles) for record in read_key_file(key_file)] == [
        ("alice", frozenset({Role.USER, Role.METRICS})), ("bob", frozenset({Role.ADMIN}))]


def test_an_existing_key_is_hashed_from_stdin_and_never_printed(tmp_path, capsys, monkeypatch):
    key_file = tmp_path / "keys.json"
    monkeypatch.setattr("sys.stdin", io.StringIO(LONG_KEY + "\n"))
    serve_main(["add-key", "--key-file", str(key_file), "--name", "ci", "--role", "user", "--key-from-stdin"])
    assert capsys.readouterr().out == ""
    assert read_key_file(key_file)[0].sha256 == hashlib.sha256(LONG_KEY.encode()).hexdigest()


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["--name", "x", "--role", "user", "--key-from-stdin"], "short-key\n",
         "the key on stdin has 9 characters: keys need at least 16"),
        (["--name", "x", "--role", "user", "--rate", "1"], "", "--rate and --burst go together, got --rate 1.0 and"),
        (["--name", "x", "--role", "user", "--rate", "0", "--burst", "1"], "", "requests_per_second"),
        (["--name", "has space", "--role", "user"], "", "name"),
        (["--name", "x", "--role", "root"], "", "invalid choice: 'root'"),
        (["--name", "taken", "--role", "user"], "", "already has a key named 'taken'"),
    ],
)
def test_bad_add_key_arguments_are_named_and_write_nothing(tmp_path, capsys, monkeypatch, argv, stdin, message):
    key_file = tmp_path / "keys.json"
    add_key(key_file, ApiKeyRecord.of_key(LONG_KEY, "taken", ["admin"]))
    before = key_file.read_text()
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit):
        serve_main(["add-key", "--key-file", str(key_file), *argv])
    assert message in capsys.readouterr().err
    assert key_file.read_text() == before


def test_the_same_key_twice_is_refused(tmp_path):
    key_file = tmp_path / "keys.json"
    add_key(key_file, ApiKeyRecord.of_key(LONG_KEY, "first", ["user"]))
    with pytest.raises(ValueError, match="already holds this key"):
        add_key(key_file, ApiKeyRecord.of_key(LONG_KEY, "second", ["user"]))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("# ops keys\nplain-key-1\n", "is not a JSON key file .*\\(the old format\\).*--key-from-stdin"),
        ('["a list"]', "is not a JSON key file"),
        ('{"keys": [{"name": "a", "sha256": "abc", "roles": ["user"]}]}', r"keys\.0\.sha256: String should match"),
        ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "roles": []}]}', r"keys\.0\.roles: .*at least 1"),
        ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "roles": ["boss"]}]}', r"keys\.0\.roles.*'admin'"),
        ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "roles": ["user"], "key": "x"}]}',
         r"keys\.0\.key: Extra inputs are not permitted"),
        ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "roles": ["user"]}, '
         '{"name": "a", "sha256": "' + "1" * 64 + '", "roles": ["user"]}]}', r"each key needs its own name.*\['a'\]"),
    ],
)
def test_malformed_key_files_are_refused_naming_the_problem(tmp_path, content, message):
    key_file = tmp_path / "keys.json"
    key_file.write_text(content)
    with pytest.raises(ValueError, match=f"API key file {key_file}.*{message}"):
        read_key_file(key_file)


def test_environment_keys_are_admin_and_join_the_file_keys(tmp_path):
    key_file = tmp_path / "keys.json"
    add_key(key_file, ApiKeyRecord.of_key(LONG_KEY, "ci", ["user"], RateLimit(requests_per_second=1, burst=2)))
    keys = load_api_keys(key_file, {"MOE_LIGHTNING_API_KEYS": f"env-key-0123456789, {LONG_KEY} ,"})
    # LONG_KEY is in both: the file's record (name, roles, limit) wins.
    assert [(k.name, sorted(k.roles), k.rate_limit) for k in keys] == [
        ("env-0", ["admin"], None), ("ci", ["user"], RateLimit(requests_per_second=1, burst=2))]
    assert keys[0].sha256 == hashlib.sha256(b"env-key-0123456789").hexdigest()
    assert load_api_keys(None, {}) == ()
    with pytest.raises(ValueError, match="missing does not exist"):
        load_api_keys(tmp_path / "missing", {})
