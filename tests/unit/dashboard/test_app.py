"""The dashboard's HTTP API, page and WebSocket, through FastAPI's TestClient (no server, no browser)."""

import pytest

pytest.importorskip("fastapi", reason="the dashboard extra (fastapi, httpx) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from moe_lightning.cli import main  # noqa: E402
from moe_lightning.dashboard.app import create_app  # noqa: E402


@pytest.fixture
def stats_file(tmp_path):
    path = tmp_path / "moe" / "version_0" / "router_stats.jsonl"
    path.parent.mkdir(parents=True)
    path.touch()
    return path


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(tmp_path, poll_seconds=0.02)) as client:
        yield client


def test_page_and_its_script_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/dashboard.js">' in page.text
    assert "new WebSocket" in client.get("/static/dashboard.js").text


def test_records_layers_and_step_ranges(client, stats_file, stats_lines):
    stats_file.write_text("".join(stats_lines))
    assert client.get("/api/status").json()["records"] == 4
    assert [r["step"] for r in client.get("/api/records", params={"start": 2, "end": 3}).json()] == [2, 3]
    series = client.get("/api/layers/1", params={"start": 3}).json()
    assert series["steps"] == [3, 4] and len(series["load_share"][0]) == 4 and len(series["imbalance"]) == 2


@pytest.mark.parametrize(
    ("url", "code", "message"),
    [
        ("/api/layers/2", 404, "unknown layer 2: the run has layers 0..1"),
        ("/api/layers/-1", 404, "unknown layer -1"),
        ("/api/records?start=3&end=1", 400, "empty step range: start=3 > end=1"),
        ("/api/layers/0?start=3&end=1", 400, "empty step range: start=3 > end=1"),
    ],
)
def test_bad_input_is_named(client, stats_file, stats_lines, url, code, message):
    stats_file.write_text("".join(stats_lines))
    response = client.get(url)
    assert response.status_code == code and message in response.json()["detail"]


def test_a_layer_before_any_record_is_explained(client):
    assert client.get("/api/layers/0").json()["detail"] == "unknown layer 0: the run has no record yet"


def test_websocket_sends_what_exists_then_pushes_appended_records(client, stats_file, stats_lines):
    stats_file.write_text(stats_lines[0])
    with client.websocket_connect("/ws") as socket:
        first = socket.receive_json()
        assert first["reset"] and first["stats_file"] == str(stats_file)
        assert [r["step"] for r in first["records"]] == [1]
        assert set(first["records"][0]["layers"][0]) >= {"load", "load_share", "imbalance", "load_entropy"}
        assert "cooccurrence" not in first["records"][0]["layers"][0]
        with stats_file.open("a") as file:
            file.writelines(stats_lines[1:3])
        pushed = socket.receive_json()
        assert not pushed["reset"] and [r["step"] for r in pushed["records"]] == [2, 3]


def test_websocket_waits_for_a_file_that_does_not_exist_yet(client, tmp_path, stats_lines):
    with client.websocket_connect("/ws") as socket:
        assert socket.receive_json() == {"reset": True, "run_dir": str(tmp_path), "stats_file": None, "records": [],
                                         "alarms_reset": True, "alarms_file": None, "alarms": []}
        (tmp_path / "router_stats.jsonl").write_text(stats_lines[0])
        assert [r["step"] for r in socket.receive_json()["records"]] == [1]


def test_alarms_are_listed_and_their_steps_chosen(client, stats_file, alarm_lines):
    (stats_file.parent / "alarms.jsonl").write_text("".join(alarm_lines))
    status = client.get("/api/status").json()
    assert status["alarms"] == 4 and status["alarms_file"] == str(stats_file.parent / "alarms.jsonl")
    alarms = client.get("/api/alarms").json()
    assert [(a["step"], a["layer"], a["metric"], a["action"]) for a in alarms] == [
        (2, 0, "load_entropy", "warn"), (2, 1, "load_entropy", "warn"),
        (4, 0, "load_entropy", "warn"), (4, 1, "load_entropy", "warn"),
    ]
    assert alarms[0]["message"].startswith("routing alarm at step 2, MoE layer 0: load_entropy=")
    assert [a["step"] for a in client.get("/api/alarms", params={"start": 3}).json()] == [4, 4]
    response = client.get("/api/alarms", params={"start": 4, "end": 2})
    assert response.status_code == 400 and "start=4 > end=2" in response.json()["detail"]


def test_websocket_pushes_alarms_as_they_fire(client, stats_file, stats_lines, alarm_lines):
    stats_file.write_text("".join(stats_lines))
    alarms_file = stats_file.parent / "alarms.jsonl"
    alarms_file.write_text("".join(alarm_lines[:2]))
    with client.websocket_connect("/ws") as socket:
        first = socket.receive_json()
        assert first["alarms_reset"] and first["alarms_file"] == str(alarms_file)
        assert [(a["step"], a["layer"]) for a in first["alarms"]] == [(2, 0), (2, 1)] and len(first["records"]) == 4
        with alarms_file.open("a") as file:
            file.write(alarm_lines[2])
        pushed = socket.receive_json()
        assert not pushed["alarms_reset"] and not pushed["reset"] and pushed["records"] == []
        assert [(a["step"], a["layer"]) for a in pushed["alarms"]] == [(4, 0)]


def test_cli_names_a_missing_run_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["dashboard", str(tmp_path / "nope")])
    assert f"RUN_DIR '{tmp_path / 'nope'}' is not a directory" in capsys.readouterr().err


def test_cli_serves_on_loopback_by_default(tmp_path, monkeypatch):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(kwargs))
    main(["dashboard", str(tmp_path)])
    assert served["host"] == "127.0.0.1" and served["port"] == 8008


def test_layer_matrices_of_a_real_run(client, stats_file, stats_lines):
    stats_file.write_text("".join(stats_lines))
    matrices = client.get("/api/layers/0/matrices", params={"start": 2, "end": 3}).json()
    assert (matrices["start"], matrices["end"], matrices["records"]) == (2, 3, 2)
    spec = matrices["specialisation"]
    assert len(spec["share"]) == 2 and len(spec["share"][0]) == 4 and 0 <= spec["nmi"] <= 1
    assert all(sum(row) == pytest.approx(1) for row, tokens in zip(spec["share"], spec["row_tokens"]) if tokens)
    assert len(matrices["cooccurrence"]["share"]) == 4 and matrices["transitions"]["next_layer"] == 1
    assert client.get("/api/layers/1/matrices").json()["transitions"]["note"].startswith("layer 1 is the last")
    assert client.get("/api/layers/2/matrices").status_code == 404
    assert client.get("/api/layers/0/matrices?start=3&end=1").status_code == 400
