"""Name -> class registries for methods and datasets, with entry-point plugins.

Built-in methods register themselves when `bench.methods` is imported; third-party packages add
theirs through the `bench.methods` (or `bench.datasets`) entry-point group, whose value is a module
(imported for its `@register_method` side effects) or a class. Plugins are loaded once, on the
first lookup, so `import bench` stays cheap.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from bench.errors import BenchError, choices_hint

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of classes, filled by a decorator and by entry points."""

    def __init__(self, kind: str, builtin_module: str, entry_point_group: str,
                 check: Callable[[str, Any], None] | None = None) -> None:
        self.kind = kind
        self._check = check
        self._builtin_module = builtin_module
        self._group = entry_point_group
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._loaded = False

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Class decorator: `@register_method("resnet18")` (default: the class's `name`)."""

        def decorator(obj: T) -> T:
            key = name or getattr(obj, "name", None)
            if not key:
                raise BenchError(f"{self.kind} {obj!r} has no name: pass one to the decorator")
            if key in self._items and self._items[key] is not obj:
                raise BenchError(
                    f"duplicate {self.kind} name '{key}': already registered by "
                    f"{self._origins[key]}, again by {obj.__module__}"
                )
            if self._check is not None:
                self._check(key, obj)
            if hasattr(obj, "name") and obj.name != key:
                obj.name = key
            self._items[key] = obj
            self._origins[key] = getattr(obj, "__module__", "?")
            return obj

        return decorator

    def load(self) -> None:
        """Import the built-ins and every installed plugin, once."""
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self._builtin_module)
        for ep in entry_points(group=self._group):
            try:
                obj: Any = ep.load()
            except BenchError:
                raise
            except Exception as exc:  # a broken plugin must not hide which one it was
                raise BenchError(
                    f"plugin '{ep.name}' ({ep.value}, entry point group {self._group}) failed to "
                    f"load: {type(exc).__name__}: {exc}"
                ) from exc
            if isinstance(obj, type) and obj not in self._items.values():
                self.register(getattr(obj, "name", None) or ep.name)(obj)

    @property
    def loaded(self) -> bool:
        return self._loaded

    def get(self, name: str) -> T:
        self.load()
        if name not in self._items:
            raise BenchError(f"unknown {self.kind} '{name}'; {choices_hint(name, self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        self.load()
        return sorted(self._items)

    def origin(self, name: str) -> str:
        self.load()
        return self._origins[name]


def _check_method(name: str, cls: Any) -> None:
    """A method's regimes must be declared ones (bench.regimes), and it defines no hook of an earlier
    version that has moved to the pretext; checked when it registers."""
    from bench.regimes import NAMES

    regimes = getattr(cls, "regimes", ())
    unknown = [r for r in regimes if r not in NAMES]
    if isinstance(regimes, str) or unknown or not regimes:
        bad = unknown[0] if unknown else repr(regimes)
        raise BenchError(f"method '{name}' ({getattr(cls, '__module__', '?')}) declares regime {bad!r}; "
                         f"{choices_hint(str(bad), NAMES)}")
    from bench.methods.base import MOVED_HOOKS

    for klass in getattr(cls, "__mro__", ())[:-1]:
        moved = next((hook for hook in MOVED_HOOKS if hook in vars(klass)), None)
        if moved is not None and klass.__module__ != "bench.methods.base":
            raise BenchError(f"method '{name}' ({klass.__module__}.{klass.__name__}) defines '{moved}', which is now "
                             f"{MOVED_HOOKS[moved]}: move it onto the pretext (docs/plugins.md, 'Adding a method')")


METHODS: Registry[Any] = Registry("method", "bench.methods", "bench.methods", _check_method)
DATASETS: Registry[Any] = Registry("dataset", "bench.datasets", "bench.datasets")

register_method = METHODS.register
register_dataset = DATASETS.register


def get_method(name: str) -> Any:
    """The registered method class called `name`."""
    return METHODS.get(name)


def create_method(name: str, cfg: Any) -> Any:
    """An instance of method `name` bound to a resolved run config."""
    return METHODS.get(name)(cfg)


def list_methods() -> list[str]:
    return METHODS.names()


def list_datasets() -> list[str]:
    return DATASETS.names()
