"""Helpers shared by the notebooks: parameter checking, the targeted methods, and publishing
results into the page's prose (:func:`publish_values`, :func:`publish_figure`, :func:`count_phrase`),
and tables as a page shows them (:func:`table_for_page`).

Parameters cells are written with annotations (``seed: int = 0  # what it is``), which IPython
records in the namespace's ``__annotations__``; :func:`check_parameters` checks the values that
papermill injected against them, so a wrong type fails in the first cell after the parameters,
naming the parameter.
"""
from __future__ import annotations

import numbers
import typing
from collections.abc import Mapping


def _accepts(expected, value) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(expected)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_accepts(arg, value) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _parse_literal(name: str, text: str):
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise TypeError(f"parameter {name}={text!r} is not a Python literal list, e.g. [2, 6]") from None
    return list(value) if isinstance(value, (list, tuple)) else value


def apply_target_rates(profile, target_rates):
    """``profile`` with its target rates replaced by ``target_rates`` (nats per sentence), or
    unchanged when the list is empty: the notebooks' ``target_rates`` parameter."""
    import dataclasses

    if not target_rates:
        return profile
    rates = tuple(float(r) for r in target_rates)
    if any(not r > 0 for r in rates):
        raise ValueError(f"parameter target_rates={list(target_rates)!r} is not accepted; accepted values: "
                         "positive rates in nats per sentence")
    return dataclasses.replace(profile, target_rates=rates)


def targeted_methods(methods, required=("FB", "MDR")) -> tuple[str, ...]:
    """The registry labels of the targeted methods a page trains at every target rate: the
    notebooks' ``methods`` parameter (registry labels or names, e.g. ``["FB", "MDR"]`` or a method
    a reader registered with :func:`tvae_core.methods.register_method`), or the thesis's
    :data:`tvae_core.experiments.TARGETED_METHODS` when it is empty. Every entry must take a target
    rate, and the page's comparisons need the ``required`` ones."""
    from .experiments import TARGETED_METHODS
    from .methods import METHODS, get_method

    if not methods:
        return TARGETED_METHODS
    accepted = tuple(m.label for m in METHODS.values() if m.takes_target)
    labels = []
    for name in methods:
        try:
            method = get_method(str(name))
        except ValueError:
            method = None
        if method is None or not method.takes_target:
            raise ValueError(f"parameter methods={list(methods)!r}: {name!r} is not accepted; accepted values: "
                             f"methods that take a target rate, {accepted}")
        if method.label not in labels:
            labels.append(method.label)
    missing = [m for m in required if m not in labels]
    if missing:
        raise ValueError(f"parameter methods={list(methods)!r} lacks {missing}: this page compares "
                         f"{' and '.join(required)}, so they must be among its methods (accepted values: {accepted})")
    return tuple(labels)


def check_parameters(namespace: dict, choices: dict[str, tuple] | None = None) -> dict:
    """Check every annotated parameter in ``namespace`` (a notebook's ``globals()``).

    ``choices`` maps a parameter to its accepted values. Returns ``{name: value}`` of the
    parameters, for the provenance record. Raises ``TypeError``/``ValueError`` naming the
    parameter and what it accepts.
    """
    annotations = namespace.get("__annotations__", {})
    if not annotations:
        raise ValueError("no annotated parameters found: the parameters cell must use `name: type = value`")
    values = {}
    for name, expected in annotations.items():
        if name not in namespace:
            continue
        value = namespace[name]
        if isinstance(value, str) and typing.get_origin(expected) in (list, tuple):
            # `papermill -p target_rates "[2, 6]"` passes the list as its text: read it as a literal
            value = namespace[name] = _parse_literal(name, value)
        if not _accepts(expected, value):
            raise TypeError(f"parameter {name}={value!r} has type {type(value).__name__}; expected {expected}")
        values[name] = value
    from .profiles import PROFILE_NAMES

    all_choices = {"profile": PROFILE_NAMES, **(choices or {})}
    for name, accepted in all_choices.items():
        if name in values and values[name] not in accepted:
            raise ValueError(f"parameter {name}={values[name]!r} is not accepted; accepted values: {tuple(accepted)}")
    return values


def publish_values(values: Mapping[str, object]) -> None:
    """Glue every value under its name for ``{glue:text}`` in the page's prose (MyST-NB), without
    displaying it where the cell ran."""
    from myst_nb import glue

    for name, value in values.items():
        glue(name, value, display=False)


def publish_figure(name: str, fig) -> None:
    """Glue ``fig`` under ``name`` for a ``{glue:figure}`` block (the page shows it where the prose
    places it, with its caption and alt text) and close it, so it is not shown a second time and
    its memory is freed."""
    import matplotlib.pyplot as plt
    from myst_nb import glue

    glue(name, fig, display=False)
    plt.close(fig)


MISSING = "—"   # how a page shows a value that does not exist (a target of a method without one)


def table_for_page(frame, digits: int):
    """``frame`` as a page shows it: every non-integer number (Python or NumPy) with ``digits``
    decimals, a missing value (NaN) as :data:`MISSING` rather than "NaN", everything else (integers,
    text) as it is. Returns a new frame."""
    import math
    import numbers

    def cell(value):
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
            return MISSING if math.isnan(value) else fixed(value, digits)
        return value

    return frame.map(cell)


def fixed(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, a value that rounds to zero as zero: '0.00', never
    '-0.00' (a tiny negative estimate, e.g. a leave-one-out marginal KL of a collapsed run)."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def count_phrase(count: int, singular: str, plural: str | None = None) -> str:
    """A count with its noun in the right number, for a sentence whose count comes from a run:
    ``count_phrase(1, "active unit")`` is '1 active unit', ``count_phrase(3, "active unit")`` '3
    active units'. ``plural`` when it is not ``singular + "s"``."""
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
        raise ValueError(f"count={count!r} must be a non-negative integer")
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"


def and_join(items) -> str:
    """A list in a sentence: 'a', 'a and b', 'a, b and c' (the items as strings, in their order)."""
    words = [str(item) for item in items]
    if not words:
        raise ValueError("items is empty: a sentence needs at least one item to list")
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
