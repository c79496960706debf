"""The quick-start notebook runs top to bottom (few steps) and produces its plot."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("JAXRLHF_NB_STEPS", "2")
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()  # fmt: skip
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (ROOT / "runs" / "notebook" / "metrics.png").is_file()
