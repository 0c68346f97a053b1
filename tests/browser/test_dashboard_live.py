"""End to end: a tiny training run appends router statistics while headless Chromium shows them live on the dashboard.

Skipped where Debian's chromium or playwright is missing, except under CI (CI=true), where ``.ci/run`` installs both
and a missing one must fail rather than hide.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
NUM_LAYERS, NUM_EXPERTS = 4, 8
# A small run, a record every 3 steps, long enough to outlast the test, which stops it once it has seen enough.
TRAIN_ARGS = [
    "fit", "--config", str(ROOT / "configs" / "synthetic-tasks.yaml"),
    "--trainer.max_steps=100000", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    '--trainer.callbacks=[{"class_path": "moe_lightning.callbacks.RouterStatsMonitor",'
    ' "init_args": {"log_every_n_steps": 3}}]',
    "--model.init_args.model.init_args.config.dim=32", "--model.init_args.model.init_args.config.expert_hidden_dim=32",
    f"--model.init_args.model.init_args.config.num_layers={NUM_LAYERS}",
    f"--model.init_args.model.init_args.config.num_experts={NUM_EXPERTS}",
    "--data.init_args.seq_len=32", "--data.init_args.batch_size=4",
]
CLI = [sys.executable, "-c", "from moe_lightning.cli import main; main()"]


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)"
    if importlib.util.find_spec("playwright") is None:
        return "needs playwright (pip install -e '.[dev]'; .ci/run installs it)"
    return None


pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(_missing() is not None and not os.environ.get("CI"), reason=str(_missing())),
]


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    # Output to a file, not a pipe, so a chatty child never blocks; shown when the test fails.
    return subprocess.Popen(args, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "the dashboard exited"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def points(page, chart: str) -> dict[int, float]:
    """``{step: value}`` of the points drawn in a line chart."""
    pairs = page.eval_on_selector_all(f"#{chart} circle", "cs => cs.map(c => [+c.dataset.step, +c.dataset.value])")
    return {int(step): value for step, value in pairs}


def test_dashboard_shows_a_running_training_live(tmp_path):
    from playwright.sync_api import sync_playwright

    run_dir = tmp_path / "runs"  # TensorBoardLogger writes runs/moe/version_0 under the training's cwd
    run_dir.mkdir()
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    dashboard = start([*CLI, "dashboard", str(run_dir), "--port", str(port)], tmp_path, tmp_path / "dashboard.log")
    training = None
    errors: list[str] = []
    try:
        wait_until_serving(f"{url}/api/status", dashboard)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.wait_for_function("document.getElementById('status').textContent.startsWith('waiting for')")
            training = start([*CLI, *TRAIN_ARGS], tmp_path, tmp_path / "training.log")

            # Live: the first record arrives, then more while the page stays open.
            page.wait_for_function("document.querySelectorAll('#imbalance circle').length >= 1", timeout=90_000)
            seen = len(points(page, "imbalance"))
            page.wait_for_function(f"document.querySelectorAll('#imbalance circle').length > {seen}", timeout=60_000)
            assert page.locator("#heatmap rect[data-tip]").count() == NUM_LAYERS * NUM_EXPERTS
            assert page.locator("#layer option").count() == NUM_LAYERS

            # Another layer: the curves redraw with that layer's values, which the API confirms.
            layer0 = points(page, "imbalance")
            page.select_option("#layer", "2")
            page.wait_for_function("document.getElementById('layer-title').textContent.endsWith('layer 2')")
            layer2 = points(page, "imbalance")
            api = httpx.get(f"{url}/api/layers/2", timeout=5).json()
            expected = dict(zip(api["steps"], api["imbalance"]))
            assert {step: expected[step] for step in layer2} == layer2
            assert any(layer0[step] != layer2[step] for step in layer0.keys() & layer2.keys())

            # Hover shows a cell's value; a one-record step range leaves one row in the per-step heatmap.
            page.hover("#layer-heatmap rect >> nth=0")
            assert page.inner_text("#tip").startswith("layer 2, step ")
            for control in ("from", "to"):
                page.eval_on_selector(f"#{control}", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
            assert page.locator("#layer-heatmap rect").count() == NUM_EXPERTS
            assert page.inner_text("#to-step") == str(api["steps"][0])
            browser.close()
    except BaseException:
        for log in tmp_path.glob("*.log"):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    finally:
        for process in (training, dashboard):
            if process is not None:
                stop(process)
    assert errors == []
