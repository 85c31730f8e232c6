"""Notebooks: every one runs through papermill in the smoke profile and checks what it computed;
every one is in the book's table of contents with exactly one documented parameters cell; the
book's executed copies were run with the default profile."""
import re
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


RUN_NOTEBOOKS = [p for p in NOTEBOOKS + [PRETRAINED_NOTEBOOK] if "train_or_load(" in p.read_text()]
TARGET_NOTEBOOKS = [p for p in NOTEBOOKS if "thesis_grid(" in p.read_text()]


@pytest.mark.parametrize("path", RUN_NOTEBOOKS, ids=lambda p: p.stem)
def test_the_knobs_a_course_turns_are_parameters(path):
    """seed and the runs folder in every notebook that trains; target rates wherever the thesis
    grid is trained (`make execute PARAMS='target_rates=[2,6]'`)."""
    params = papermill.inspect_notebook(str(path))
    assert {"seed", "runs_dir"} <= set(params), path.name
    if path in TARGET_NOTEBOOKS:
        assert params["target_rates"]["inferred_type_name"] == "list[float]"
    if path.name.startswith("02_"):   # the page that compares the targeted methods takes them as a knob
        assert params["methods"]["inferred_type_name"] == "list[str]"
    source = path.read_text()
    assert "train_or_load(" in source and source.count("runs_root") >= 2, \
        f"{path.name}: every train_or_load call must take the runs_dir parameter"


def test_target_rates_parameter_replaces_the_profiles_and_accepts_papermill_text():
    from tvae_core.notebook import apply_target_rates, check_parameters
    from tvae_core.profiles import get_profile

    namespace = {"__annotations__": {"profile": str, "target_rates": list[float]}, "profile": "smoke",
                 "target_rates": "[2, 6]"}   # `papermill -p target_rates "[2, 6]"` passes text
    assert check_parameters(namespace)["target_rates"] == [2, 6] and namespace["target_rates"] == [2, 6]
    assert apply_target_rates(get_profile("smoke"), [2, 6]).target_rates == (2.0, 6.0)
    assert apply_target_rates(get_profile("smoke"), []) is get_profile("smoke")
    with pytest.raises(ValueError, match="target_rates"):
        apply_target_rates(get_profile("smoke"), [0])
    with pytest.raises(TypeError, match="target_rates"):
        check_parameters({**namespace, "target_rates": "[2, "})


def test_methods_parameter_selects_registered_targeted_methods_and_keeps_the_compared_ones():
    from tvae_core.experiments import TARGETED_METHODS, thesis_grid
    from tvae_core.notebook import check_parameters, targeted_methods

    assert targeted_methods([]) == TARGETED_METHODS == ("FB", "MDR", "CYC-FB")
    assert targeted_methods(["mdr", "FB", "MDR"]) == ("MDR", "FB")   # names or labels, each once
    namespace = {"__annotations__": {"methods": list[str]}, "methods": "['FB', 'MDR']"}   # papermill text
    assert targeted_methods(check_parameters(namespace)["methods"]) == ("FB", "MDR")
    grid = thesis_grid("smoke", targeted_methods=("FB", "MDR"))
    assert [label for label in grid if label.startswith("CYC-FB")] == []
    assert {cfg.objective.name for cfg in grid.values()} == {"vae", "ae", "cyc", "fb", "mdr"}
    with pytest.raises(ValueError, match=r"methods=.*'VAE' is not accepted.*take a target rate"):
        targeted_methods(["FB", "MDR", "VAE"])
    with pytest.raises(ValueError, match=r"methods=.*'nope' is not accepted"):
        targeted_methods(["FB", "MDR", "nope"])
    with pytest.raises(ValueError, match=r"methods=\['FB'\] lacks \['MDR'\]"):
        targeted_methods(["FB"])


def test_make_execute_params_are_parsed_and_given_to_the_notebooks_that_declare_them():
    from tvae_core.book import _known_parameters, parse_parameters

    parsed = parse_parameters("target_rates=[2,6] seed=1 runs_dir=/tmp/runs")
    assert parsed == {"target_rates": [2, 6], "seed": 1, "runs_dir": "/tmp/runs"}
    assert parse_parameters("") == {}
    with pytest.raises(ValueError, match="name=value"):
        parse_parameters("target_rates")
    assert set(_known_parameters(ROOT / "notebooks" / "02_free_bits_vs_mdr.ipynb", parsed)) == set(parsed)
    assert _known_parameters(ROOT / "notebooks" / "00_exact_vae.ipynb", parsed) == {"seed": 1}
    makefile = (ROOT / "Makefile").read_text()
    assert "--params" in makefile and "$(PARAMS)" in makefile and "$(ONLY)" in makefile


def test_a_params_name_that_no_selected_notebook_declares_fails_before_anything_runs(capsys):
    from tvae_core.book import execute_all, main

    with pytest.raises(ValueError, match=r"PARAMS \['sead'\]: declared by none .*accepted names: .*'seed'"):
        execute_all("smoke", only=["00"], parameters={"sead": 1})
    with pytest.raises(ValueError, match=r"\['target_rates'\]"):   # 00 has no target rates
        execute_all("smoke", only=["00"], parameters={"target_rates": [2, 6]})
    with pytest.raises(SystemExit) as exit_:
        main(["--profile", "smoke", "--only", "00", "--params", "sead=1"])
    assert exit_.value.code == 2 and "sead" in capsys.readouterr().err


ALL_SOURCES = NOTEBOOKS + [PRETRAINED_NOTEBOOK]
_HIDDEN = {"hide-input", "hide-cell", "remove-input", "remove-cell"}


@pytest.mark.parametrize("path", ALL_SOURCES, ids=lambda p: p.stem)
def test_pages_hide_bookkeeping_cells_and_give_every_figure_alt_text(path):
    """glue/publish and assert cells stay in the notebook but are folded or removed on the page; the
    closing checks are removed; every glued figure has alt text (not the image's hash)."""
    nb = nbformat.read(str(path), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]
    for cell in code:
        if any(call in cell.source for call in ("glue(", "publish_values(", "publish_figure(", "assert ")):
            assert _HIDDEN & set(cell.metadata.get("tags", [])), f"{path.name}: visible bookkeeping cell:\n{cell.source[:200]}"
    checks = [c for c in code if "assert " in c.source and "solution" not in c.metadata.get("tags", [])]
    assert "remove-cell" in checks[-1].metadata.get("tags", []), f"{path.name}: the closing checks are shown"
    figures = [c.source for c in nb.cells if c.cell_type == "markdown" and "{glue:figure}" in c.source]
    for source in figures:
        for block in source.split("```{glue:figure}")[1:]:
            options = block.split("\n\n", 1)[0]
            assert ":alt: " in options, f"{path.name}: a glued figure without alt text:\n{block[:120]}"


@pytest.mark.parametrize("path", ALL_SOURCES, ids=lambda p: p.stem)
def test_every_chapter_has_exercises_with_folded_executed_solutions_prerequisites_and_time(path):
    nb = nbformat.read(str(path), as_version=4)
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    exercises = [s for s in markdown if s.startswith("**Exercise ")]
    assert 2 <= len(exercises) <= 4, f"{path.name}: {len(exercises)} exercises"
    assert any(s.startswith("## Exercises") for s in markdown)
    solutions = [c for c in nb.cells if c.cell_type == "code" and "solution" in c.metadata.get("tags", [])]
    assert solutions, f"{path.name}: no solution cells"
    # folded on the page; executed with it (the smoke tests above run every cell, these included)
    assert all({"hide-cell", "remove-cell"} & set(c.metadata.tags) for c in solutions)
    assert any("```{admonition} Solution\n:class: dropdown" in s for s in markdown)
    learn = next(s for s in markdown if s.startswith("## What you will learn"))
    assert "**Prerequisites:**" in learn and "**Time:**" in learn


def test_the_book_removes_stderr_and_has_the_reference_pages():
    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())
    assert config["execute"]["stderr_output"] == "remove"
    assert "sphinx.ext.autodoc" in config["sphinx"]["extra_extensions"]
    assert {"notation", "api"} <= set(_toc_files())
    assert "overflow-x: auto" in (ROOT / "book" / "_static" / "tvae.css").read_text()


# what a reader must never see on a page: the build machine's paths, warnings, progress bars
LEAKS = [re.compile(p) for p in (r"/(?:work|tmp|root|home|Users)/[\w.-]+/", r"Warning\b", r"\bit/s\b")]


def _shown_outputs(nb):
    """The outputs a rendered page shows: stderr is removed by the book (execute.stderr_output),
    cells and streams by their remove-* tags."""
    for cell in nb.cells:
        tags = set(cell.metadata.get("tags", []))
        if cell.cell_type != "code" or tags & {"remove-cell", "remove-output"}:
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                if output.get("name") == "stderr" or (output.get("name") == "stdout" and "remove-stdout" in tags):
                    continue
                yield output.get("text", "")
            elif output.get("output_type") in ("display_data", "execute_result"):
                data = output.get("data", {})
                yield data.get("text/html", "") or data.get("text/plain", "")
            elif output.get("output_type") == "error":
                yield "\n".join(output.get("traceback", []))


# the committed page of notebook 06 was executed before its training cell was tagged remove-stdout:
# it shows "[tvae] run ... stored in <absolute path>" until `make book-pretrained` re-executes it
@pytest.mark.parametrize("path", sorted(EXECUTED.glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_committed_pages_show_no_paths_warnings_or_progress_bars(path):
    nb = nbformat.read(str(path), as_version=4)
    for text in _shown_outputs(nb):
        text = "".join(text) if isinstance(text, list) else text
        for pattern in LEAKS:
            match = pattern.search(text)
            assert match is None, f"{path.name} shows {match.group(0)!r}: ...{text[max(0, match.start() - 80):match.end() + 80]}..."


def test_execution_stores_paths_relative_to_the_checkout(tmp_path):
    from tvae_core.book import relative_paths

    root = tmp_path / "checkout"
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"input_path": f"{root}/notebooks/01.ipynb", "output_path": f"{root}/book/x.ipynb"}
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=[f"{root}/.venv/lib/a.py:1: Warn\n"]),
                    nbformat.v4.new_output("stream", name="stdout", text=f"stored in {root}/data/runs/abc\n"),
                    nbformat.v4.new_output("execute_result", data={"text/plain": "0.5"}, execution_count=1)]
    nb.cells = [cell]
    out = relative_paths(nb, root)
    assert out.metadata["papermill"] == {"input_path": "notebooks/01.ipynb", "output_path": "book/x.ipynb"}
    assert [o.get("text") for o in out.cells[0].outputs[:2]] == [".venv/lib/a.py:1: Warn\n",
                                                                   "stored in data/runs/abc\n"]
    assert out.cells[0].outputs[2]["data"] == {"text/plain": "0.5"}


@pytest.mark.parametrize("path", sorted(EXECUTED.glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_committed_pages_store_no_build_machine_path(path):
    """Not even in stderr or metadata, which the rendered page hides but a downloaded notebook shows."""
    text = path.read_text()
    match = re.search(r"/(?:work|tmp|root|home|Users)/[\w.-]+/", text)
    assert match is None, f"{path.name} stores {match.group(0)!r}"


def test_the_stamp_names_the_processor_model_whose_bfloat16_path_moves_last_digits():
    import os
    import platform

    from tvae_core.book import machine_description

    text = machine_description()
    assert text.startswith(platform.machine()) and text.endswith(f"{os.cpu_count()} CPU cores")
    if os.path.exists("/proc/cpuinfo") and "model name" in open("/proc/cpuinfo").read():
        assert len(text.split(", ")) == 3, text


def test_a_page_table_shows_missing_values_as_a_dash_and_floats_at_fixed_digits():
    import math

    import numpy as np
    import pandas as pd

    from tvae_core.notebook import MISSING, table_for_page

    frame = pd.DataFrame({"target r": [math.nan, 16.0], "rate": [0.0123, 16.456], "active units": [0, 32]},
                         index=["VAE", "MDR 16"])
    shown = table_for_page(frame, 2)
    assert shown.loc["VAE", "target r"] == MISSING and shown.loc["MDR 16", "target r"] == "16.00"
    assert list(shown["rate"]) == ["0.01", "16.46"] and list(shown["active units"]) == [0, 32]
    assert table_for_page(pd.DataFrame({"x": [np.float32(0.5), True]}, dtype=object), 1)["x"].tolist() == ["0.5", True]
    assert "NaN" not in shown.to_html() and frame.loc["VAE", "target r"] != frame.loc["VAE", "target r"]  # input kept


def test_a_number_that_rounds_to_zero_is_shown_without_a_sign():
    import pandas as pd

    from tvae_core.notebook import fixed, table_for_page

    assert fixed(-0.001, 2) == "0.00" and fixed(-0.004, 3) == "-0.004" and fixed(-1.0, 2) == "-1.00"
    assert fixed(0.0, 1) == "0.0" and fixed(-0.0, 2) == "0.00" and fixed(12.345, 1) == "12.3"
    assert table_for_page(pd.DataFrame({"kl": [-0.001, -0.5]}), 2)["kl"].tolist() == ["0.00", "-0.50"]


def test_a_list_in_the_prose_is_joined_with_and():
    from tvae_core.notebook import and_join

    assert and_join(["600 steps"]) == "600 steps"
    assert and_join(["FB 32", "MDR 32"]) == "FB 32 and MDR 32"
    assert and_join(f"{b:,}" for b in (600, 1500, 3000)) == "600, 1,500 and 3,000"
    with pytest.raises(ValueError, match="items"):
        and_join([])


def test_a_count_in_the_prose_takes_its_noun_in_the_right_number():
    from tvae_core.notebook import count_phrase

    assert count_phrase(1, "active unit") == "1 active unit"
    assert count_phrase(0, "active unit") == "0 active units"
    assert count_phrase(24, "distinct reconstruction") == "24 distinct reconstructions"
    assert count_phrase(1, "run at its ceiling", "runs at their ceiling") == "1 run at its ceiling"
    assert count_phrase(2, "run at its ceiling", "runs at their ceiling") == "2 runs at their ceiling"
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="count="):
            count_phrase(bad, "unit")
