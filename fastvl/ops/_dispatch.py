"""Glue between a custom op's implementation and the backend registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastvl import backends
from fastvl.backends import Call


def run(impls: dict[str, Callable[..., Any]], request: str, call: Call, *args: Any) -> Any:
    """Select the backend for ``call`` (request is a name or 'auto') and run its implementation."""
    name = backends.select(call.op, request, call)
    return impls[name](*args)


def public(op_name: str, make_call: Callable[..., Call | list[Call]]):
    """Decorator for a public functional op: attaches its registry name and ``make_call`` for explain()."""

    def deco(fn):
        fn.op_name = op_name
        fn.make_call = make_call
        return fn

    return deco
