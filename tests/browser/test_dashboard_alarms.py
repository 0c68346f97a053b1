"""The dashboard's alarm list in headless Chromium: the alarms a real run fired, newest first, the chosen layer's rows
marked, a click choosing a row's layer, and an alarm appended while the page is open showing up at the top."""

import json

from lightning.pytorch.loggers import TensorBoardLogger

from moe_lightning.callbacks import RouterStatsMonitor
from moe_lightning.callbacks.alarms import AlarmRule, RoutingAlarms
from tests.browser import test_dashboard_live as live
from tests.unit.callbacks.fixtures import loader, tiny_module, trainer

pytestmark = live.pytestmark  # the same marks, and the same skip where chromium or playwright is missing


def rows(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#alarms tbody tr",
        "rs => rs.map(r => ({cells: [...r.cells].map(c => c.textContent), current: r.classList.contains('current')}))",
    )


def test_the_alarm_list_shows_fired_alarms_newest_first_and_new_ones_live(tmp_path):
    from playwright.sync_api import sync_playwright

    # Only a perfectly even load has entropy 1: the alarm fires on both layers at steps 1, 2 and 3.
    alarms = RoutingAlarms([AlarmRule("load_entropy", 1.0)], check_every_n_steps=1)
    monitor = RouterStatsMonitor(log_every_n_steps=1, num_labels=2, log_images=False)
    trainer(tmp_path, [monitor, alarms], logger=TensorBoardLogger(tmp_path / "runs", name="moe"), max_steps=3).fit(
        tiny_module(), loader())
    alarms_file = tmp_path / "runs" / "moe" / "version_0" / "alarms.jsonl"
    fired = [json.loads(line) for line in alarms_file.read_text().splitlines()]
    assert [(a["step"], a["layer"]) for a in fired] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]

    port = live.free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    dashboard = live.start([*live.CLI, "dashboard", str(tmp_path / "runs"), "--port", str(port)], tmp_path,
                           tmp_path / "dashboard.log")
    errors: list[str] = []
    try:
        live.wait_until_serving(f"{url}/api/status", dashboard)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(live.CHROMIUM), args=live.CHROMIUM_ARGS)
            page = browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('#alarms tbody tr').length === 6")
            assert page.inner_text("#alarms-title") == "Alarms: 6 fired"
            drawn = rows(page)
            last = fired[-1]
            assert drawn[0]["cells"] == [str(last["step"]), str(last["layer"]), "load_entropy",
                                         f"{last['value']:.3f}", "1", "warn", "-"]
            assert [r["cells"][:2] for r in drawn] == [[str(a["step"]), str(a["layer"])] for a in reversed(fired)]
            assert [r["current"] for r in drawn] == [r["cells"][1] == "0" for r in drawn]  # layer 0 is chosen
            page.hover("#alarms tbody tr >> nth=0")
            assert page.inner_text("#tip") == last["message"]

            page.click("#alarms tbody tr >> nth=0")  # step 3, layer 1
            assert page.input_value("#layer") == "1"
            assert [r["current"] for r in rows(page)] == [r["cells"][1] == "1" for r in rows(page)]

            with alarms_file.open("a") as file:
                file.write(json.dumps({**fired[0], "step": 99, "metric": "dead_experts", "value": 2.0,
                                       "threshold": 0.0, "action": "bias_bump", "experts": [1, 3]}) + "\n")
            page.wait_for_function("document.querySelectorAll('#alarms tbody tr').length === 7")
            assert rows(page)[0]["cells"] == ["99", "0", "dead_experts", "2", "0", "bias_bump", "1, 3"]
            browser.close()
    except BaseException:
        print(f"--- dashboard.log\n{(tmp_path / 'dashboard.log').read_text()[-3000:]}")
        raise
    finally:
        live.stop(dashboard)
    assert errors == []

