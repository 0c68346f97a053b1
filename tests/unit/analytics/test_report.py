"""The report builds from a real (tiny) run and states the final per-layer statistics the monitor wrote."""

import json

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from moe_lightning.callbacks import RouterStatsMonitor, RoutingTraceWriter
from moe_lightning.cli import main
from tests.unit.callbacks.fixtures import loader, tiny_module, trainer


def test_report_from_a_real_run(tmp_path, capsys):
    callbacks = [RouterStatsMonitor(log_every_n_steps=2, num_labels=2), RoutingTraceWriter(every_n_steps=2, max_tokens=8)]
    trainer(tmp_path, callbacks, logger=TensorBoardLogger(tmp_path, name="run"), max_steps=4).fit(tiny_module(), loader())

    main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    assert "index.html" in capsys.readouterr().out
    out = tmp_path / "report"
    for name in ("index.html", "summary.json", "load_heatmap.png", "balance.png", "health.png", "cooccurrence.png",
                 "specialisation.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    last = json.loads((tmp_path / "run" / "version_0" / "router_stats.jsonl").read_text().splitlines()[-1])
    assert summary["steps"] == [2, 4]
    assert [layer["nmi"] for layer in summary["final"]["layers"]] == [layer["nmi"] for layer in last["layers"]]
    assert set(summary["top_tokens"]) == {"0", "1"} and len(summary["top_tokens"]["0"]) == 4


def test_report_shows_expert_time_shares_when_timing_was_on(tmp_path):
    monitor = RouterStatsMonitor(log_every_n_steps=2, num_labels=2, time_experts=True)
    trainer(tmp_path, [monitor], logger=TensorBoardLogger(tmp_path, name="run"), max_steps=2).fit(tiny_module(), loader())

    main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    out = tmp_path / "report"
    assert (out / "time_share.png").stat().st_size > 0
    assert 'src="time_share.png"' in (out / "index.html").read_text()
    last = json.loads((tmp_path / "run" / "version_0" / "router_stats.jsonl").read_text().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["expert_time_share"] == [layer["expert_time_share"] for layer in last["layers"]]


def test_report_without_timing_has_no_time_share(tmp_path):
    trainer(tmp_path, [RouterStatsMonitor(log_every_n_steps=2)], logger=TensorBoardLogger(tmp_path, name="run"),
            max_steps=2).fit(tiny_module(), loader())
    main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    assert not (tmp_path / "report" / "time_share.png").exists()
    assert "expert_time_share" not in json.loads((tmp_path / "report" / "summary.json").read_text())["final"]


def test_report_without_stats_is_explained(tmp_path):
    with pytest.raises(ValueError, match="no router_stats.jsonl under"):
        main(["report", str(tmp_path)])
