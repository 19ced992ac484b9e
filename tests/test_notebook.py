"""tarea2.ipynb: the stored copy is the full run on the real data, in the brief's order; a fast copy
runs end to end, headless (real data subset when ../shared/data is there, else a synthetic set)."""
from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import nbformat
import pytest

from report import execute_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "tarea2.ipynb"
TIMEOUT_S = 600  # per cell
#: The brief's questions, in its order, then what the notebook adds after them.
SECTIONS = ("P1.1", "P1.2", "P1.3", "P1.4", "P2.1", "P2.2", "P2.3", "P2.4", "P2.5", "P2.6",
            *(f"P3.{i}" for i in range(1, 13)), "LIME sobre VGG16DWSep", "Bonus", "Anexos")
SHOWN_SOURCE = ("DWSepConv2d", "VGG16DWSep", "EarlyStopping", "ReplicarMuestreoDePrueba", "sample_perturbations",
                "perturbed_arrays", "cosine_distance", "kernel_weights", "fit_logistic", "slic_segments",
                "kmeans_labels", "birch_labels")


def error_outputs(notebook) -> list[str]:
    return [f"cell {i}: {output.get('ename')}: {output.get('evalue')}"
            for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"
            for output in cell.get("outputs", []) if output.get("output_type") == "error"]


def stdout_lines(notebook, marker: str) -> list[str]:
    return [line for cell in notebook.cells for output in cell.get("outputs", []) if output.get("name") == "stdout"
            for line in output.get("text", "").splitlines() if line.startswith(marker)]


def markdown_outputs(notebook) -> list[str]:
    return [output["data"]["text/markdown"] for cell in notebook.cells for output in cell.get("outputs", [])
            if "text/markdown" in output.get("data", {})]


def headings(notebook) -> list[str]:
    return [line.lstrip("#").strip() for cell in notebook.cells if cell.cell_type == "markdown"
            for line in cell.source.splitlines() if line.startswith("#")]


def cases_per_cell(notebook) -> Counter:
    """Rows per confusion-matrix cell of the table of explained test images."""
    table = next(t for t in markdown_outputs(notebook) if t.startswith("| celda | archivo | real |"))
    return Counter(row.split("|")[1].strip() for row in table.splitlines()[2:])


def test_stored_notebook_is_the_full_run_in_the_briefs_order():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert NOTEBOOK.stat().st_size < 3_000_000
    assert error_outputs(notebook) == []
    assert stdout_lines(notebook, "FAST=")[0].startswith("FAST=False, ENTRENAR=False")  # loads a finished run
    found = headings(notebook)
    positions = [next((i for i, h in enumerate(found) if h.startswith(section)), None) for section in SECTIONS]
    assert None not in positions, dict(zip(SECTIONS, positions))
    assert positions == sorted(positions), "sections out of the brief's order"
    texts = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    assert "COMENTARIO_" not in texts  # every discussion written
    assert "CC BY 4.0" in texts and "uso clínico" in texts
    shown = "\n".join(markdown_outputs(notebook))
    assert [name for name in SHOWN_SOURCE if not re.search(rf"\b(class|def) {name}\b", shown)] == []
    counts = cases_per_cell(notebook)  # two explained images from every cell of the confusion matrix that has two
    sizes = dict(part.rsplit(" ", 1) for part in stdout_lines(notebook, "imágenes de prueba por celda:")[0]
                 .split(": ", 1)[1].split("; "))
    assert len(sizes) == 4
    assert all(counts[cell] >= min(2, int(n)) for cell, n in sizes.items()), (sizes, counts)
    assert any(line.startswith("z: (1000,") for line in stdout_lines(notebook, "z: "))  # >= 1000 samples


def test_the_source_the_stored_notebook_shows_is_the_current_code():
    """``fuente(...)`` prints `module.qualname` and its source: a change to that code leaves the stored
    notebook showing the old one until it is executed again."""
    import importlib
    import inspect

    shown = "\n".join(markdown_outputs(nbformat.read(NOTEBOOK, as_version=4)))
    blocks = re.findall(r"`([\w.]+)`\n```python\n(.*?)\n```", shown, flags=re.S)
    assert len(blocks) >= 10
    stale = []
    for dotted, source in blocks:
        module, _, qualname = dotted.rpartition(".")
        while module and not _importable(module):
            module, _, outer = module.rpartition(".")
            qualname = f"{outer}.{qualname}"
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if inspect.getsource(obj).rstrip() != source:
            stale.append(dotted)
    assert stale == [], f"execute tarea2.ipynb again (README): it shows old source of {stale}"


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_notebook_runs_in_fast_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("TAREA2_FAST", "1")
    monkeypatch.setenv("TAREA2_OUT", str(out))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    try:
        execute_notebook(notebook, ROOT, tmp_path / "kernels", TIMEOUT_S)  # raises on the first failing cell
        assert error_outputs(notebook) == []
        assert stdout_lines(notebook, "python: ") == [f"python: {sys.executable}"]  # the venv's kernel ran it
        assert stdout_lines(notebook, "FAST=")[0].startswith("FAST=True")
        assert (out / "entrenamiento" / "metrics.json").is_file()
        for figure in ("slic.png", "perturbadas.png", "importancia_slic.png", "segmentaciones.png", "lime_casos.png",
                       "bonus.png"):
            assert (out / figure).is_file(), figure
        inception = stdout_lines(notebook, "inception_v3 omitido") + stdout_lines(notebook, "clase más probable")
        assert len(inception) == 1
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the checkpoint alone is 1.25 GB
