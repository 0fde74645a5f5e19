"""Launch choices that tests and benchmarks force inside a ``with`` block (innermost wins)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Override(Generic[T]):
    """A stack of forced values; :attr:`value` is the innermost one, ``None`` outside any block."""

    def __init__(self) -> None:
        self._stack: list[T] = []

    @property
    def value(self) -> T | None:
        return self._stack[-1] if self._stack else None

    @contextmanager
    def forced(self, value: T) -> Iterator[None]:
        self._stack.append(value)
        try:
            yield
        finally:
            self._stack.pop()
