"""The dashboard's FastAPI app: one page, its static JS, a JSON API and a WebSocket that pushes new records and fired
alarms."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from moe_lightning.dashboard.tail import ALARMS_FILE, StatsTail, TailCursor
from moe_lightning.dashboard.views import UnknownLayerError, in_step_range, layer_matrices, layer_series, slim

STATIC = Path(__file__).parent / "static"


def create_app(run_dir: str | Path, poll_seconds: float = 0.5) -> FastAPI:
    """The app over ``run_dir``; raises ``ValueError`` naming it when it is not a directory.

    Every request and every open WebSocket polls the file (a few bytes when nothing changed), so no background
    task outlives the server.
    """
    if poll_seconds <= 0:
        raise ValueError(f"poll_seconds must be > 0, got poll_seconds={poll_seconds}")
    tail = StatsTail(run_dir)
    alarms = StatsTail(run_dir, ALARMS_FILE)
    app = FastAPI(title="moe-lightning router dashboard")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (STATIC / "index.html").read_text()

    @app.get("/api/status")
    def status() -> dict:
        tail.poll()
        alarms.poll()
        return {
            "run_dir": str(tail.run_dir),
            "stats_file": _path(tail),
            "records": len(tail.records),
            "layers": len(tail.records[0]["layers"]) if tail.records else 0,
            "alarms_file": _path(alarms),
            "alarms": len(alarms.records),
        }

    @app.get("/api/records")
    def records(start: int | None = None, end: int | None = None) -> list[dict]:
        tail.poll()
        try:
            return [slim(r) for r in in_step_range(tail.records, start, end)]
        except ValueError as error:
            raise HTTPException(400, str(error)) from error

    @app.get("/api/alarms")
    def fired_alarms(start: int | None = None, end: int | None = None) -> list[dict]:
        """The alarms RoutingAlarms fired (``alarms.jsonl``), in order, at steps in ``[start, end]``."""
        alarms.poll()
        try:
            return in_step_range(alarms.records, start, end)
        except ValueError as error:
            raise HTTPException(400, str(error)) from error

    @app.get("/api/layers/{layer}")
    def layer(layer: int, start: int | None = None, end: int | None = None) -> dict:
        tail.poll()
        return _layer_view(layer_series, tail.records, layer, start, end)

    @app.get("/api/layers/{layer}/matrices")
    def matrices(layer: int, start: int | None = None, end: int | None = None) -> dict:
        """The specialisation, co-occurrence and transition matrices summed over the steps (the socket has none)."""
        tail.poll()
        return _layer_view(layer_matrices, tail.records, layer, start, end)

    @app.websocket("/ws")
    async def stream(websocket: WebSocket) -> None:
        """Sends ``{reset, run_dir, stats_file, records, alarms_reset, alarms_file, alarms}``: every record and alarm
        first (again after its file restarts), then each batch of new ones."""
        await websocket.accept()
        closed = asyncio.ensure_future(_until_disconnect(websocket))
        records, fired = TailCursor(tail), TailCursor(alarms)
        try:
            while not closed.done():
                tail.poll()
                alarms.poll()
                (reset, new), (alarms_reset, new_alarms) = records.take(), fired.take()
                if reset or new or alarms_reset or new_alarms:
                    await websocket.send_json({
                        "reset": reset, "run_dir": str(tail.run_dir), "stats_file": _path(tail),
                        "records": [slim(r) for r in new],
                        "alarms_reset": alarms_reset, "alarms_file": _path(alarms), "alarms": new_alarms,
                    })
                await asyncio.wait([closed], timeout=poll_seconds)
        except WebSocketDisconnect:
            pass
        finally:
            closed.cancel()

    return app


def _path(tail: StatsTail) -> str | None:
    return None if tail.path is None else str(tail.path)


def _layer_view(view: Callable[..., dict], records: list[dict], layer: int, start: int | None, end: int | None) -> dict:
    try:
        return view(records, layer, start, end)
    except UnknownLayerError as error:
        raise HTTPException(404, str(error)) from error
    except ValueError as error:
        raise HTTPException(400, str(error)) from error


async def _until_disconnect(websocket: WebSocket) -> None:
    # The page sends nothing; reading is how a closed tab is noticed while no record arrives.
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass
