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
NUM_TASKS = 5  # SyntheticTasksDataModule's tasks: its task ids are the labels of the specialisation view
# A small run, a record every 3 steps, long enough to outlast the test, which stops it once it has seen enough.
TRAIN_ARGS = [
    "fit", "--config", str(ROOT / "configs" / "synthetic-tasks.yaml"),
    "--trainer.max_steps=100000", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    '--trainer.callbacks=[{"class_path": "moe_lightning.callbacks.RouterStatsMonitor",'
    ' "init_args": {"log_every_n_steps": 3, "time_experts": true}}]',
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


def matrix(page, view: str) -> dict:
    """A matrix view as drawn: its layer, step range and cell values (None where undefined), read in one go."""
    drawn = page.eval_on_selector(
        f"#{view}",
        "svg => ({layer: svg.dataset.layer, start: svg.dataset.start, end: svg.dataset.end,"
        " values: [...svg.querySelectorAll('rect[data-tip]')].map(r => r.dataset.value)})",
    )
    drawn["values"] = [None if v == "" else float(v) for v in drawn["values"]]
    return drawn


def api_matrix(url: str, drawn: dict, view: str) -> dict:
    """The same view from the API, for the layer and steps the page drew."""
    params = {"start": drawn["start"], "end": drawn["end"]}
    return httpx.get(f"{url}/api/layers/{drawn['layer']}/matrices", params=params, timeout=5).json()[view]


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
            nmi = points(page, "nmi")
            assert nmi and {step: dict(zip(api["steps"], api["nmi"]))[step] for step in nmi} == nmi
            # Expert time shares (the run times its experts): one row per drawn step, the API's values.
            page.wait_for_function("document.getElementById('time-share-title').textContent.endsWith('layer 2')")
            drawn = page.eval_on_selector_all("#time-share rect[data-tip]", "rs => rs.map(r => +r.dataset.value)")
            rows = len(drawn) // NUM_EXPERTS
            assert rows >= 1 and len(drawn) == rows * NUM_EXPERTS
            api_rows = [share for share in api["expert_time_share"] if share is not None]
            assert drawn == pytest.approx([v for row in api_rows[:rows] for v in row])

            # The matrices of layer 2 over the chosen steps: every cell drawn, holding what the API sums for them.
            page.wait_for_function("document.getElementById('specialisation').dataset.layer === '2'")
            spec = matrix(page, "specialisation")
            assert len(spec["values"]) == NUM_TASKS * NUM_EXPERTS and any(v for v in spec["values"])
            expected = api_matrix(url, spec, "specialisation")
            assert spec["values"] == pytest.approx([v for row in expected["share"] for v in row])
            cooc = matrix(page, "cooccurrence")
            assert len(cooc["values"]) == NUM_EXPERTS**2 and any(v for v in cooc["values"])  # top-2: pairs co-occur
            assert cooc["values"][0] is None  # expert 0 with itself
            transitions = matrix(page, "transitions")
            assert len(transitions["values"]) == NUM_EXPERTS**2
            expected = api_matrix(url, transitions, "transitions")
            assert transitions["values"] == pytest.approx([v for row in expected["share"] for v in row])
            page.hover("#specialisation rect >> nth=0")
            first_label = api_matrix(url, spec, "specialisation")["rows"][0]
            assert page.inner_text("#tip").startswith(f"layer 2, {first_label}, expert 0: ")

            # Hover shows a cell's value; a one-record step range leaves one row in the per-step heatmap.
            page.hover("#layer-heatmap rect >> nth=0")
            assert page.inner_text("#tip").startswith("layer 2, step ")
            for control in ("from", "to"):
                page.eval_on_selector(f"#{control}", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
            assert page.locator("#layer-heatmap rect").count() == NUM_EXPERTS
            assert page.inner_text("#to-step") == str(api["steps"][0])

            # Clicking layer 3's row of the load heatmap redraws the specialisation with layer 3's counts; it is the
            # last layer, so the transitions view says so instead of drawing.
            first = str(api["steps"][0])
            ready = "(layer) => { const d = document.getElementById('specialisation').dataset;"
            ready += f" return d.layer === layer && d.start === '{first}' && d.end === '{first}'; }}"
            page.wait_for_function(ready, arg="2")
            spec2 = matrix(page, "specialisation")
            page.click(f"#heatmap rect[data-tip] >> nth={3 * NUM_EXPERTS}")
            page.wait_for_function(ready, arg="3")
            spec3 = matrix(page, "specialisation")
            assert page.input_value("#layer") == "3" and spec3["values"] != spec2["values"]
            expected = api_matrix(url, spec3, "specialisation")
            assert spec3["values"] == pytest.approx([v for row in expected["share"] for v in row])
            assert page.locator("#transitions rect").count() == 0
            assert "layer 3 is the last MoE layer" in page.inner_text("#transitions + .note")
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
