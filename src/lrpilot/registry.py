"""Named registries: how lrpilot finds a controller, memory, LLM backend, schedule or guard rule by name.

A new component is one file that defines it and one `REGISTRY.add(...)` line (or `@REGISTRY.register(...)`);
the CLI's choices, `--help` text and errors come from the registry, so nothing else is edited.

    from lrpilot.registry import Registry
    SCHEDULES: Registry[Callable] = Registry("schedule", field="--baseline")
    SCHEDULES.add("cosine", cosine_lr, help="cosine decay to min_lr_ratio x peak (Loshchilov & Hutter 2017)")
    SCHEDULES.get("cosine")      # -> cosine_lr
    SCHEDULES.get("cosin")       # ConfigError: --baseline 'cosin': unknown schedule; choose one of: cosine, ...

Entries may be registered lazily (`add_lazy("openai", "lrpilot.llm.openai_backend:OpenAIBackend")`), so a
registry never imports an optional dependency until that entry is asked for (smolagents' pattern).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lrpilot.config import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component: its name, the object (or a 'module:attr' path not yet imported), a one-line
    help text for the CLI, and an optional config class (a frozen dataclass) the component is built from."""

    name: str
    target: T | str
    help: str = ""
    config: type | None = None


class Registry(Generic[T]):
    """Components of one kind by name. `kind` names them in errors ("controller"); `field` is the flag or config
    field that selects one ("--controller"), so an unknown name fails with a one-line error naming both."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind
        self.field = field
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, target: T | str, help: str = "", config: type | None = None) -> None:
        """Register `target` (an object, or a lazy 'module:attr' path) under `name`.

        Raises ValueError if the name is empty, has spaces or is already taken (registries are append-only)."""
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"{self.kind} name {name!r}: must be a non-empty word")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, target, help, config)

    def add_lazy(self, name: str, path: str, help: str = "", config: type | None = None) -> None:
        """Register `module:attr`, imported only when `get(name)` is called (for optional dependencies)."""
        if ":" not in path:
            raise ValueError(f"lazy {self.kind} {name!r}: path {path!r} must be 'module:attr'")
        self.add(name, path, help, config)

    def register(self, name: str, help: str = "", config: type | None = None) -> Callable[[T], T]:
        """Decorator form of `add`: `@CONTROLLERS.register("rules", help=...)` above a class or function."""

        def deco(obj: T) -> T:
            self.add(name, obj, help, config)
            return obj

        return deco

    def entry(self, name: str) -> Entry[T]:
        """The entry for `name`. Raises ConfigError (one line: the field, the bad name, the choices)."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"{self.field} {name!r}: unknown {self.kind}; choose one of: {', '.join(self.names())}"
            ) from None

    def get(self, name: str) -> T:
        """The registered object, importing a lazy entry on first use (ImportError propagates with the
        backend's own message naming the extra to install)."""
        e = self.entry(name)
        if isinstance(e.target, str):
            module, _, attr = e.target.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._entries[name] = Entry(e.name, obj, e.help, e.config)
            return obj
        return e.target

    def names(self) -> list[str]:
        """Registered names in registration order (the CLI's `choices`)."""
        return list(self._entries)

    def help_text(self) -> str:
        """'name: help' for each entry, joined for an argparse help string."""
        return "; ".join(f"{e.name}: {e.help}" if e.help else e.name for e in self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def registered(registry: Registry[Any], name: str) -> Any:
    """`registry.get(name)`; a convenience for call sites that read better as a function."""
    return registry.get(name)
