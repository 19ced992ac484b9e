"""Tests of report.py (the notebook's display helpers) and pipelines.data.linked_subset."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data import index_dataset, linked_subset
from report import markdown_table, metric_rows, png_as_jpeg


def test_markdown_table_formats_floats_none_and_pipes():
    text = markdown_table([{"a": 0.12345, "b": None, "c": "x|y"}, {"a": 2, "b": 1.0, "c": "z"}])
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 0.123 | n/a | x\\|y |", "| 2 | 1.000 | z |"]
    with pytest.raises(ValueError):
        markdown_table([])
    with pytest.raises(ValueError, match="keys"):
        markdown_table([{"a": 1}, {"b": 2}])


def test_png_as_jpeg_shrinks_but_never_enlarges(tmp_path):
    Image.fromarray(np.zeros((300, 1200, 4), np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "small.png")
    assert Image.open(io.BytesIO(png_as_jpeg(tmp_path / "wide.png", 600))).size == (600, 150)
    assert Image.open(io.BytesIO(png_as_jpeg(tmp_path / "small.png", 600))).size == (100, 50)


def test_metric_rows_lists_no_tta_then_each_rule_of_each_d():
    m = {k: 0.5 for k in ("accuracy", "f1", "precision", "recall", "specificity")} | {"roc_auc": None}
    rows = metric_rows({"no_tta": m, "tta4": {"max_confidence": m, "mean_probability": m}})
    assert [r["prediction"] for r in rows] == ["no TTA", "TTA d=4, max confidence", "TTA d=4, mean probability"]  # as train.py prints them
    assert rows[0]["roc_auc"] is None and rows[0]["f1"] == 0.5


def test_linked_subset_links_the_asked_number_per_class_and_split(tiny_folder, tmp_path):
    out = linked_subset(tiny_folder, tmp_path / "sub", {"train": 2, "test": 1}, seed=1)
    index = index_dataset(out)
    assert index.train.classes == index_dataset(tiny_folder).train.classes
    for split, n in (("train", 2), ("test", 1)):
        for class_dir in sorted((out / split).iterdir()):
            links = list(class_dir.iterdir())
            assert len(links) == n and all(p.is_symlink() and p.resolve().is_relative_to(Path(tiny_folder).resolve())
                                           for p in links)
    again = linked_subset(tiny_folder, tmp_path / "again", {"train": 2, "test": 1}, seed=1)
    assert sorted(p.name for p in again.rglob("*.*")) == sorted(p.name for p in out.rglob("*.*"))
    with pytest.raises(FileExistsError):
        linked_subset(tiny_folder, out, {"train": 1})
    with pytest.raises(ValueError, match="fewer"):
        linked_subset(tiny_folder, tmp_path / "big", {"train": 10_000})


def test_markdown_to_pdf_renders_tables_and_images_and_counts_pages(tmp_path):
    from report import markdown_to_pdf

    Image.fromarray(np.full((60, 120, 3), 200, np.uint8)).save(tmp_path / "fig.png")
    body = "\n\n".join(f"Párrafo {i} con texto suficiente para ocupar una línea entera de la página." for i in range(120))
    (tmp_path / "r.md").write_text(f"# Informe\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![f](fig.png)\n\n{body}\n",
                                   encoding="utf-8")
    pages = markdown_to_pdf(tmp_path / "r.md", tmp_path / "r.pdf")
    import pymupdf

    with pymupdf.open(tmp_path / "r.pdf") as document:
        assert pages == document.page_count >= 2  # 120 paragraphs do not fit one page
        text = document[0].get_text()
        assert "Informe" in text and "Párrafo 0" in text
        assert document[0].get_images()  # the figure is embedded
    with pytest.raises(FileNotFoundError):
        markdown_to_pdf(tmp_path / "missing.md", tmp_path / "x.pdf")


def test_committed_report_pdf_has_at_most_ten_pages_and_every_section():
    """The brief's limit: 8 pages plus 2 of annexes; and the PDF holds every heading of informe.md
    (rendered from it, not from an older text)."""
    import pymupdf

    from report import _missing_headings

    root = Path(__file__).resolve().parents[1]
    with pymupdf.open(root / "informe.pdf") as document:
        assert 1 <= document.page_count <= 10
        text = "".join(page.get_text() for page in document)
    assert _missing_headings((root / "informe.md").read_text(encoding="utf-8"), text) == []


def test_every_figure_the_report_shows_is_in_the_repository():
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "informe.md").read_text(encoding="utf-8")
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text) + re.findall(r'<img src="([^"]+)"', text)
    assert len(figures) == text.count("![") + text.count("<img ")
    assert figures and [f for f in figures if not (root / f).is_file()] == []


def test_markdown_to_pdf_refuses_a_pdf_that_lost_content(tmp_path):
    from report import markdown_to_pdf

    Image.fromarray(np.full((1200, 300, 3), 200, np.uint8)).save(tmp_path / "tall.png")  # taller than a page at full width
    (tmp_path / "r.md").write_text("# Informe\n\n![t](tall.png)\n\n## Anexo\n\ntexto\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Anexo"):
        markdown_to_pdf(tmp_path / "r.md", tmp_path / "r.pdf")
    (tmp_path / "s.md").write_text('# Informe\n\n<img src="tall.png" width="120">\n\n## Anexo\n\ntexto\n', encoding="utf-8")
    assert markdown_to_pdf(tmp_path / "s.md", tmp_path / "s.pdf") >= 1
