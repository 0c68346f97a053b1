import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from moe_lightning.callbacks import RouterStatsMonitor
from tests.unit.callbacks.fixtures import loader, tiny_module, trainer


@pytest.fixture(scope="package")
def stats_lines(tmp_path_factory) -> list[str]:
    """The lines RouterStatsMonitor wrote in a real 4-step run (2 layers, 4 experts): the real format, not a copy."""
    tmp_path = tmp_path_factory.mktemp("run")
    monitor = RouterStatsMonitor(log_every_n_steps=1, num_labels=2, log_images=False)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer(tmp_path, [monitor], logger=logger, max_steps=4).fit(tiny_module(), loader())
    return (tmp_path / "run" / "version_0" / "router_stats.jsonl").read_text().splitlines(keepends=True)
