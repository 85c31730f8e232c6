"""Helpers shared by the notebooks: parameter checking and the run table.

Parameters cells are written with annotations (``seed: int = 0  # what it is``), which IPython
records in the namespace's ``__annotations__``; :func:`check_parameters` checks the values that
papermill injected against them, so a wrong type fails in the first cell after the parameters,
naming the parameter.
"""
from __future__ import annotations

import typing


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
