"""The example notebooks run top to bottom on the embedded model, and are stored without outputs.

Each notebook is executed with nbclient in a fresh kernel started from this interpreter (jupyter_client runs
a kernel spec whose command is ``python`` with ``sys.executable``, so the kernel sees this venv and the
editable steerlib). Notebooks write only under ``$STEERLIB_NB_OUT``, set here to a temporary folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 900  # generous: CPU runs share two cores with other jobs


def _kernel_name() -> str:
    """A kernel spec that launches this interpreter; ipykernel's built-in one does when none is installed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no python3 kernel spec; run `python -m ipykernel install --sys-prefix`")
    exe = spec.argv[0]
    if exe not in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}", sys.executable):
        pytest.skip(f"the python3 kernel spec runs {exe}, not this interpreter ({sys.executable}); "
                    "run `python -m ipykernel install --sys-prefix` from the venv")
    return "python3"


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_extract.ipynb", "02_steer_monitor.ipynb", "03_flag.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("STEERLIB_NB_OUT", str(out))
    monkeypatch.delenv("STEERLIB_VECTORS", raising=False)  # each notebook must stand on its own
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=_kernel_name(),
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(out.iterdir()), "the notebook should write its outputs under STEERLIB_NB_OUT"
