"""Notebooks: every one runs through papermill in the smoke profile and checks what it computed;
every one is in the book's table of contents with exactly one documented parameters cell; the
book's executed copies were run with the default profile."""
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXECUTED = ROOT / "book" / "notebooks"


def _toc_files():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [chapter["file"] for chapter in part["chapters"]]
    return files


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_in_the_toc_with_one_documented_parameters_cell(path):
    assert f"notebooks/{path.stem}" in _toc_files()
    nb = nbformat.read(str(path), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged parameters"
    params = papermill.inspect_notebook(str(path))
    assert {"profile", "seed"} <= set(params)
    for name, spec in params.items():
        assert spec["help"].strip(), f"{path.name}: parameter {name} has no description"
        assert spec["inferred_type_name"] not in ("None", ""), f"{path.name}: parameter {name} has no type"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{path.name}: the source notebook must be committed without outputs"


def _glued_names(nb) -> set[str]:
    names = set()
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            names |= set(output.get("metadata", {}).get("scrapbook", {}).get("name", "").split()) - {""}
    return names


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_the_smoke_profile(path, tmp_path):
    out = tmp_path / path.name
    papermill.execute_notebook(str(path), str(out), parameters={"profile": "smoke", "show_progress": False},
                               cwd=str(ROOT), progress_bar=False)
    nb = nbformat.read(str(out), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "not every cell ran"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    # the notebook's closing cell asserts on what it computed; it must be there and have run
    assert any("assert " in c.source for c in code[-3:]), f"{path.name} ends without checks"
    assert len(_glued_names(nb)) >= 3, f"{path.name} glues fewer than 3 results into its prose"


def test_book_notebooks_were_executed_with_the_default_profile():
    executed = sorted(EXECUTED.glob("[0-9][0-9]_*.ipynb"))
    assert [p.name for p in executed] == sorted([p.name for p in NOTEBOOKS] + [PRETRAINED_NOTEBOOK.name]), \
        "run `make execute` (and `make book-pretrained`) to refresh the book"
    for path in executed:
        nb = nbformat.read(str(path), as_version=4)
        assert nb.metadata["papermill"]["parameters"]["profile"] == "default", path.name
        stamp = nb.metadata["tvae_provenance"]
        assert stamp["profile"] == "default", path.name
        assert set(stamp["compute"]) == {"torch CPU capability", "LM head in bfloat16 evaluation", "malloc"}, \
            path.name


def test_the_provenance_page_lists_each_pages_stamp_with_its_code_paths(tmp_path, monkeypatch):
    from tvae_core import book

    executed, book_dir = tmp_path / "notebooks", tmp_path / "book"
    executed.mkdir()
    book_dir.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["tvae_provenance"] = {"profile": "default", "parameters": {"profile": "default"}, "seconds": 1.25,
                                      "executed_at": "2026-11-29T00:00:00+00:00", "machine": "x86_64, 2 CPU cores",
                                      "versions": {"torch": "2.13.0"}, "compute": book.compute_paths()}
    nbformat.write(nb, str(executed / "00_stamped.ipynb"))
    nbformat.write(nbformat.v4.new_notebook(), str(executed / "01_unstamped.ipynb"))
    monkeypatch.setattr(book, "EXECUTED_DIR", executed)
    monkeypatch.setattr(book, "BOOK_DIR", book_dir)
    page = book.write_provenance_page().read_text()
    assert "- run time: 1.2 s" in page and "| torch | 2.13.0 |" in page
    for key, value in book.compute_paths().items():
        assert f"- {key}: {value}" in page
    assert "## `01_unstamped`" in page and "No provenance stamp" in page


@pytest.mark.slow
def test_a_failing_notebook_is_named_with_its_cell_and_never_replaces_the_book_copy(tmp_path):
    from tvae_core.book import NotebookFailed, execute_notebook

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile: str = "smoke"  # run size\nshow_progress: bool = True  # bars')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise RuntimeError('boom')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = tmp_path / "99_broken.ipynb"
    nbformat.write(nb, str(source))
    output = tmp_path / "book" / "99_broken.ipynb"
    output.parent.mkdir()
    output.write_text("previous good copy")
    with pytest.raises(NotebookFailed, match=r"99_broken\.ipynb failed in cell \d+ .*RuntimeError: boom"):
        execute_notebook(source, output, "smoke")
    assert output.read_text() == "previous good copy"


PRETRAINED_NOTEBOOK = ROOT / "notebooks" / "pretrained" / "06_pretrained_strong_decoder.ipynb"


@pytest.mark.slow
def test_pretrained_notebook_runs_in_the_smoke_profile(tmp_path):
    """Not yet in the book (its default profile needs ~30 CPU minutes); the smoke run trains a few
    steps with the packaged MiniLM + SmolLM2 weights, or fills in "n/a" when they are absent."""
    out = tmp_path / PRETRAINED_NOTEBOOK.name
    papermill.execute_notebook(str(PRETRAINED_NOTEBOOK), str(out),
                               parameters={"profile": "smoke", "show_progress": False}, cwd=str(ROOT),
                               progress_bar=False)
    nb = nbformat.read(str(out), as_version=4)
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert len(_glued_names(nb)) >= 3


@pytest.mark.slow
def test_notebook_outputs_are_deterministic_given_parameters(tmp_path):
    """The exact-VAE notebook draws every sample from seeded generators: two executions with the
    same parameters glue identical numbers (all but its wall-clock timing)."""
    source = ROOT / "notebooks" / "00_exact_vae.ipynb"
    glued = []
    for name in ("first", "second"):
        out = tmp_path / f"{name}.ipynb"
        papermill.execute_notebook(str(source), str(out), parameters={"profile": "smoke", "show_progress": False},
                                   cwd=str(ROOT), progress_bar=False)
        nb = nbformat.read(str(out), as_version=4)
        values = {}
        for cell in nb.cells:
            for output in cell.get("outputs", []):
                name_ = output.get("metadata", {}).get("scrapbook", {}).get("name")
                text = output.get("data", {}).get("application/papermill.record/text/plain")
                if name_ and text is not None and not any(t in name_ for t in ("time", "seconds")):
                    values[name_] = text  # wall-clock timings are the only glued values allowed to differ
        glued.append(values)
    assert len(glued[0]) >= 10 and glued[0] == glued[1]


def test_pretrained_notebook_is_in_the_toc_and_its_page_is_committed():
    """The pretrained chapter is executed by `make book-pretrained`, not `make book`: its executed
    page must be committed (or the strict build fails), and it must come from the default profile."""
    assert f"notebooks/{PRETRAINED_NOTEBOOK.stem}" in _toc_files()
    page = ROOT / "book" / "notebooks" / PRETRAINED_NOTEBOOK.name
    assert page.is_file(), "run `make book-pretrained` and commit book/notebooks/06_*.ipynb"
    stamp = nbformat.read(str(page), as_version=4).metadata["tvae_provenance"]
    assert stamp["profile"] == "default"


def test_smoke_executions_never_write_over_the_book_and_pretrained_sources_are_separate():
    from tvae_core import book

    assert book.output_dir_for("smoke") != book.EXECUTED_DIR
    assert book.output_dir_for("default") == book.EXECUTED_DIR == book.output_dir_for("full")
    assert [p.name for p in book.source_notebooks(pretrained=True)] == [PRETRAINED_NOTEBOOK.name]
    assert PRETRAINED_NOTEBOOK.name not in [p.name for p in book.source_notebooks()]
    with pytest.raises(ValueError, match="workers"):
        book.execute_all("smoke", workers=0)
