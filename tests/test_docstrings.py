"""Every public docstring of the package is valid reStructuredText: the API reference renders them
with autodoc in a build that fails on any warning (``make render``), and a formula such as
``|a - b|^2`` outside a literal is read as a broken substitution. Checked here with docutils alone,
in seconds, so the test suite catches what only the book's build would. Every cross-reference
(``:func:`...```, ``:class:`...```) names something that exists: the API page links it, and a
reference to a renamed object would link nowhere without a warning."""
import builtins
import dataclasses
import importlib
import inspect
import io
import pkgutil
import re

import docutils.core
from docutils import nodes
from docutils.parsers.rst import roles

import tvae_core

# Sphinx's cross-reference roles, which plain docutils does not know: rendered as literals here
SPHINX_ROLES = ("func", "class", "meth", "mod", "attr", "data", "doc", "cite", "exc", "obj", "ref")


def _public_docstrings():
    for info in pkgutil.walk_packages(tvae_core.__path__, "tvae_core."):
        if info.name.endswith("__main__"):   # importing it runs the command line
            continue
        module = importlib.import_module(info.name)
        if module.__doc__:
            yield info.name, inspect.cleandoc(module.__doc__)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.getdoc(obj):
                yield f"{info.name}.{name}", inspect.getdoc(obj)
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    documented = inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod))
                    if not member.startswith("_") and documented and inspect.getdoc(value):
                        yield f"{info.name}.{name}.{member}", inspect.getdoc(value)


def test_every_public_docstring_is_valid_restructured_text():
    # docutils' process-wide role tables, restored below (a later Sphinx build in this process
    # registers its own roles)
    registered = {table: dict(getattr(roles, table)) for table in ("_roles", "_role_registry")}
    for role in SPHINX_ROLES:
        roles.register_generic_role(role, nodes.literal)
    seen, problems = 0, []
    try:
        for where, doc in _public_docstrings():
            seen += 1
            messages = io.StringIO()
            docutils.core.publish_doctree(doc, settings_overrides={"report_level": 2, "halt_level": 5,
                                                                   "warning_stream": messages})
            if messages.getvalue():
                problems.append(f"{where}: {messages.getvalue().strip()}")
    finally:
        for table, entries in registered.items():
            getattr(roles, table).clear()
            getattr(roles, table).update(entries)
    assert seen > 100, f"only {seen} docstrings found: the walk over the package is broken"
    assert not problems, "docstrings that do not render:\n" + "\n".join(problems)


def test_the_check_catches_a_formula_outside_a_literal():
    messages = io.StringIO()
    docutils.core.publish_doctree("k(a, b) = exp(-|a - b|^2)", settings_overrides={
        "report_level": 2, "halt_level": 5, "warning_stream": messages})
    assert "substitution" in messages.getvalue()


# a cross-reference role and its target (``~`` and an explicit title dropped)
_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj):`(?:[^`<]*<)?~?([^`>]+?)>?`")
_THIRD_PARTY = ("torch", "pyro", "datasets", "transformers", "pandas", "numpy", "safetensors", "tokenizers",
                "matplotlib", "papermill")


def _own_docstrings(module):
    """The docstrings written in ``module`` (not those its classes inherit)."""
    yield module.__doc__ or ""
    for obj in vars(module).values():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        yield (obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)) or ""
        if inspect.isclass(obj):
            for value in vars(obj).values():
                function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if inspect.isfunction(function):
                    yield function.__doc__ or ""


def _lookup(scope, parts) -> bool:
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(scope) and i == len(parts) - 1 and part in {f.name for f in dataclasses.fields(scope)}:
            return True
        if not hasattr(scope, part):
            if hasattr(scope, "__path__"):   # a submodule not imported as an attribute
                try:
                    return _lookup(importlib.import_module(f"{scope.__name__}.{part}"), parts[i + 1:])
                except ImportError:
                    return False
            return False
        scope = getattr(scope, part)
    return True


def _resolves(target: str, module) -> bool:
    """As Sphinx looks a target up: in the module, its package and its classes (a leading dot:
    relative), else as an absolute dotted path."""
    target = target.strip().removesuffix("()")
    if target.split(".")[0] in _THIRD_PARTY or hasattr(builtins, target):
        return True
    parts = target.lstrip(".").split(".")
    package = importlib.import_module(module.__name__ if hasattr(module, "__path__")
                                      else module.__name__.rpartition(".")[0])
    scopes = [module, package] + [obj for obj in vars(module).values() if inspect.isclass(obj)]
    if any(_lookup(scope, parts) for scope in scopes):
        return True
    for i in range(len(parts), 0, -1):
        try:
            return _lookup(importlib.import_module(".".join(parts[:i])), parts[i:])
        except ImportError:
            continue
    return False


def test_every_cross_reference_in_a_docstring_names_something_that_exists():
    broken, seen = [], 0
    for info in pkgutil.walk_packages(tvae_core.__path__, "tvae_core."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for doc in _own_docstrings(module):
            for target in _ROLE.findall(doc):
                seen += 1
                if not _resolves(target, module):
                    broken.append(f"{info.name}: {target}")
    assert seen > 50, f"only {seen} cross-references found: the scan is broken"
    assert not broken, "cross-references to nothing:\n" + "\n".join(broken)


def test_the_reference_check_finds_a_renamed_object():
    import tvae_core.analysis as analysis

    assert _resolves("tvae_core.evaluation.RunEvaluation", analysis)
    assert _resolves("~tvae_core.model.TransformerVAE.save_pretrained".lstrip("~"), analysis)
    assert _resolves("PairedDifference.ordering", analysis)
    assert not _resolves("tvae_core.evaluation.Evaluation", analysis)
    assert not _resolves("TransformerVAE.save_pretrained", analysis)   # not in analysis's namespace
