"""Small display helpers for tarea2.ipynb (tables as Markdown, PNG figures as small JPEGs, the rows
of the test-metrics table), its headless execution, and the report's PDF.

    python report.py [tarea2.ipynb]          # execute it in place with this interpreter's kernel
                                             # (TAREA2_FAST=1 unless set; the stored copy: README)
    python report.py informe.md informe.pdf  # render the report (make informe)
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

from pipelines.tables import markdown_table  # noqa: F401  (the notebook's tables)

METRIC_COLUMNS = ("accuracy", "f1", "precision", "recall", "specificity", "roc_auc")


def png_as_jpeg(path: str | PathLike[str], width: int = 860, quality: int = 80) -> bytes:
    """A figure reduced to ``width`` pixels (never enlarged) as JPEG bytes: a notebook that stores
    its outputs stays small."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((width, 4 * width))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def metric_rows(test: Mapping[str, Any], label: str = "prediction") -> list[dict[str, Any]]:
    """The rows of ``metrics.json``'s ``test`` block: no TTA, then both TTA rules for each d."""
    from models.training import named_predictions

    return [{label: name, **{k: m.get(k) for k in METRIC_COLUMNS}} for name, m in named_predictions(test)]


def show_png(path: str | PathLike[str], width: int = 860) -> None:
    from IPython.display import Image, display

    display(Image(data=png_as_jpeg(path, width), format="jpeg"))


def this_python_kernel(folder: str | PathLike[str]):
    """A kernel manager that starts ipykernel with this interpreter (the venv's), from a kernel spec
    written under ``folder``: the user's and the system's Jupyter kernel specs are never consulted."""
    from pathlib import Path

    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    write_kernel_spec(Path(folder) / "python3")
    specs = KernelSpecManager(kernel_dirs=[str(folder)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def execute_notebook(notebook, workdir: str | PathLike[str], kernels: str | PathLike[str], timeout_s: int = 600):
    """Run every cell of an nbformat notebook in ``workdir`` (raises CellExecutionError on the first
    failing cell); the outputs are stored in the notebook object."""
    import nbclient

    client = nbclient.NotebookClient(notebook, km=this_python_kernel(kernels), timeout=timeout_s,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return notebook


#: Page style of the report: A4, compact body text, tables and figures that fit the page.
REPORT_CSS = """
body { font-family: sans-serif; font-size: 10pt; line-height: 1.3; }
h1 { font-size: 16pt; } h2 { font-size: 13pt; margin-top: 10pt; } h3 { font-size: 11pt; }
table { border-collapse: collapse; font-size: 8.5pt; margin: 4pt 0; }
th, td { border: 1px solid #999; padding: 1pt 4pt; }
code, pre { font-size: 8.5pt; }
img { width: 100%; }
"""


def _missing_headings(markdown: str, pdf_text: str) -> list[str]:
    """The Markdown headings whose text is not in the PDF (markup and spacing ignored)."""
    import re

    flat = re.sub(r"\s+", " ", pdf_text)
    headings = [re.sub(r"[`*_]", "", line.lstrip("#").strip()) for line in markdown.splitlines() if line.startswith("#")]
    return [h for h in headings if h and re.sub(r"\s+", " ", h) not in flat]


def markdown_to_pdf(source: str | PathLike[str], target: str | PathLike[str]) -> int:
    """Render a Markdown file (tables, images relative to its folder) to an A4 PDF with markdown-pdf;
    returns the number of pages."""
    from pathlib import Path

    import pymupdf
    from markdown_pdf import MarkdownPdf, Section

    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"no such Markdown file: {source}")
    text = source.read_text(encoding="utf-8")
    pdf = MarkdownPdf(toc_level=2, mode="commonmark", optimize=True)
    pdf.m_d.enable("table")  # GFM tables without gfm-like's linkify dependency
    pdf.meta["title"] = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("# ")),
                             source.stem)
    pdf.add_section(Section(text, root=str(source.parent.resolve()), paper_size="A4"), user_css=REPORT_CSS)
    pdf.save(str(target))
    with pymupdf.open(target) as document:
        missing = _missing_headings(text, "".join(page.get_text() for page in document))
        pages = document.page_count
    if missing:  # PyMuPDF's Story stops quietly at content it cannot place, e.g. a figure taller than a page
        raise ValueError(f"{target}: the PDF stops before {missing[0]!r} ({len(missing)} headings lost); "
                         "a figure taller than the page? give it a smaller width")
    return pages


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import os
    import tempfile
    from pathlib import Path

    import nbformat

    parser = argparse.ArgumentParser(description="Execute a notebook in place with this interpreter's kernel "
                                                 "(TAREA2_FAST defaults to 1), or render a Markdown report to PDF.")
    parser.add_argument("notebook", nargs="?", default="tarea2.ipynb", type=Path,
                        help="the notebook to execute, or a Markdown report to render (with OUTPUT)")
    parser.add_argument("output", nargs="?", type=Path, help="the PDF a Markdown report is rendered to")
    args = parser.parse_args(argv)
    if args.notebook.suffix == ".md":
        if args.output is None:
            parser.error("a Markdown report needs the PDF to write: python report.py informe.md informe.pdf")
        pages = markdown_to_pdf(args.notebook, args.output)
        print(f"wrote {args.output} ({pages} pages, {args.output.stat().st_size / 1e6:.2f} MB)")
        return 0
    os.environ.setdefault("TAREA2_FAST", "1")
    notebook = nbformat.read(args.notebook, as_version=4)
    with tempfile.TemporaryDirectory() as kernels:
        execute_notebook(notebook, args.notebook.resolve().parent, kernels)
    nbformat.write(notebook, args.notebook)
    print(f"executed and saved {args.notebook} ({args.notebook.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
