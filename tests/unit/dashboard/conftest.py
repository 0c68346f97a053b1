import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from moe_lightning.callbacks import RouterStatsMonitor
from moe_lightning.callbacks.alarms import AlarmRule, RoutingAlarms
from tests.unit.callbacks.fixtures import loader, tiny_module, trainer


@pytest.fixture(scope="package")
def run_files(tmp_path_factory):
    """The log dir of a real 4-step run (2 layers, 4 experts) with RouterStatsMonitor and RoutingAlarms writing in
    it: the real formats, not copies."""
    tmp_path = tmp_path_factory.mktemp("run")
    monitor = RouterStatsMonitor(log_every_n_steps=1, num_labels=2, log_images=False)
    # Only a perfectly even load has entropy 1: this alarm fires on both layers at every check.
    alarms = RoutingAlarms([AlarmRule("load_entropy", 1.0)], check_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer(tmp_path, [monitor, alarms], logger=logger, max_steps=4).fit(tiny_module(), loader())
    return tmp_path / "run" / "version_0"


@pytest.fixture(scope="package")
def stats_lines(run_files) -> list[str]:
    """The lines RouterStatsMonitor wrote: one record per step."""
    return (run_files / "router_stats.jsonl").read_text().splitlines(keepends=True)


@pytest.fixture(scope="package")
def alarm_lines(run_files) -> list[str]:
    """The lines RoutingAlarms wrote: steps 2 and 4, layers 0 and 1."""
    return (run_files / "alarms.jsonl").read_text().splitlines(keepends=True)
