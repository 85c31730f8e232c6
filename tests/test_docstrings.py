"""Every public docstring of the package is valid reStructuredText: the API reference renders them
with autodoc in a build that fails on any warning (``make render``), and a formula such as
``|a - b|^2`` outside a literal is read as a broken substitution. Checked here with docutils alone,
in seconds, so the test suite catches what only the book's build would."""
import importlib
import inspect
import io
import pkgutil

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
