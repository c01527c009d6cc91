"""Name -> factory registries used for datasets, backbones, teachers, rules and metrics, and the declared
measures that reports explain (declared on the ground floor, so that any floor can declare what it computes).

A new component is one file plus ``@REGISTRY.register("name")``. Unknown names raise a
``TeachxError`` listing the valid names and the closest match.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, Optional, TypeVar

from teachx.errors import ConfigError

T = TypeVar("T")


def suggest(name: str, valid: list[str], prefix: str = "") -> str:
    """' (did you mean 'x'?)' for the closest valid name, or ''; ``prefix`` (e.g. 'train.') is put before
    the suggestion, so that it reads as the whole key the user writes."""
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """A case-insensitive mapping from names to factories, with helpful errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[key] = obj
            for alias in aliases:
                self._aliases[alias.lower()] = key
            return obj

        return decorator

    def canonical(self, name: str) -> str:
        key = str(name).lower()
        key = self._aliases.get(key, key)
        if key not in self._items:
            valid = self.names()
            raise ConfigError(
                f"unknown {self.kind} '{name}'{suggest(key, valid + list(self._aliases))}; "
                f"valid {self.kind}s: {', '.join(valid)}"
            )
        return key

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        return sorted(self._items)

    def aliases(self, name: str) -> list[str]:
        """The other names ``name`` is registered under."""
        key = self.canonical(name)
        return sorted(a for a, target in self._aliases.items() if target == key)

    def __contains__(self, name: object) -> bool:
        key = str(name).lower()
        return self._aliases.get(key, key) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


@dataclass(frozen=True)
class Measure:
    """A number reports show, with one plain sentence on what it measures and which direction is better
    (``higher_is_better`` None: neither, e.g. a reference level)."""

    name: str
    description: str
    higher_is_better: Optional[bool]

    @property
    def direction(self) -> str:
        return {True: "Higher is better.", False: "Lower is better."}.get(
            self.higher_is_better, "It is a reference, not a score."
        )

    def sentence(self) -> str:
        return f"{self.description} {self.direction}"


#: the measures that are not ``Metric`` classes (accuracy, map agreement, ...), declared where each is computed
MEASURES: dict[str, Measure] = {}


def declare_measure(name: str, description: str, higher_is_better: Optional[bool]) -> Measure:
    """Declare a reported number next to its definition (see :class:`Measure`)."""
    MEASURES[name] = Measure(name, description, higher_is_better)
    return MEASURES[name]
