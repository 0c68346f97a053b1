"""examples/notebooks/router_analysis.ipynb runs top to bottom (so it cannot rot) and shows its two figures."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs nbformat and nbclient (the dev extra)")
nbclient = pytest.importorskip("nbclient", reason="needs nbformat and nbclient (the dev extra)")

CELL_HANG_SECONDS = 1800
NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebooks" / "router_analysis.ipynb"


@pytest.mark.slow
def test_router_analysis_notebook_executes():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Runs in the notebook's folder, as Jupyter would; a failing cell raises CellExecutionError with its traceback.
    # The cell timeout only guards against a hang: the training cell took over 300 s on a 2-core machine under load.
    client = nbclient.NotebookClient(notebook, timeout=CELL_HANG_SECONDS, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert text.count("NMI(task; top-1 expert)") == 4
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2
