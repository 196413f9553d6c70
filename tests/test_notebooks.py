"""The example notebooks execute top to bottom in their small setting (JPEFT_SMALL=1), and the
committed .ipynb files are exactly what examples/build_notebooks.py writes."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
NOTEBOOKS = ["quickstart.ipynb", "hf_finetune_export.ipynb", "forgetting.ipynb", "bank_routing.ipynb", "nnx_lora.ipynb"]


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", os.path.join(EXAMPLES, "build_notebooks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kernel_manager(tmp_path):
    """A kernel running this very interpreter (the test venv), whatever kernels are
    installed elsewhere: a kernelspec written into a temporary folder."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kdir = tmp_path / "kernels" / "jpeft-test"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jpeft test", "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="jpeft-test", kernel_spec_manager=ksm)


def test_committed_notebooks_match_the_builder():
    import nbformat

    b = _builder()
    books = {"quickstart.ipynb": b.QUICKSTART, "hf_finetune_export.ipynb": b.HF,
             "forgetting.ipynb": b.FORGETTING, "bank_routing.ipynb": b.BANK, "nnx_lora.ipynb": b.NNX}
    assert sorted(books) == sorted(NOTEBOOKS)
    for name, cells in books.items():
        nb = nbformat.read(os.path.join(EXAMPLES, name), as_version=4)
        nbformat.validate(nb)
        assert [c.source for c in nb.cells] == [c.source for c in cells], f"{name} is stale: run examples/build_notebooks.py"
        assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source
        assert any("JPEFT_SMALL" in c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("JPEFT_SMALL", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("JPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(EXAMPLES, name), as_version=4)
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the cell's traceback if any cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
