"""Parsed TOML into the configuration's attrs classes, by cattrs, with one-line errors.

The configuration modules (:mod:`twinfer.config`, :mod:`twinfer.taskconfig`)
declare each TOML table as a frozen attrs class whose fields are its keys.  A
field's type says what its key takes, strictly: TOML's ``true`` is not an
integer, ``"3"`` is not a number, a string is not a list, and a table takes
only the keys its class declares.  ``Annotated`` adds checks, functions that
return the value (perhaps normalised) or raise :class:`Invalid`::

    queue_size: Annotated[int, at_least(1)] = 256

A leading :class:`Raw` parses the TOML value itself instead of the type's
hook (a lone number where a list is allowed); :func:`table` adds a check on
a whole table, for keys that depend on each other.  cattrs reports problems
as exception groups noting the attribute or index each came from;
:func:`config_errors` follows them to the first one and raises a
:class:`~twinfer.errors.ConfigError` naming its key path:
``models[1].detect.anchors.strides: expected num_layers = 2 strides, got 1``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Annotated, Any, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote, BaseValidationError, IterableValidationNote
from cattrs.gen import make_dict_structure_fn, override

from twinfer.errors import ConfigError

T = TypeVar("T")
Check = Callable[[Any], Any]
TableCheck = Callable[[Any, Mapping[str, Any]], Any]
#: A key path: keys and list indices, outermost first.
Path = tuple[str | int, ...]

#: Structures TOML values strictly; raises cattrs' exception groups or :class:`Invalid`.
converter = cattrs.Converter(detailed_validation=True)
structure = converter.structure
_TABLES: dict[type, tuple[TableCheck | None, frozenset[str], frozenset[str]]] = {}


class Invalid(ValueError):
    """A value the configuration refuses; ``path`` leads from it down to the bad key."""

    def __init__(self, message: str, *path: str | int) -> None:
        super().__init__(message)
        self.message = message
        self.path: Path = path


@attrs.frozen
class Raw:
    """First in ``Annotated[...]``: ``parse`` takes the TOML value instead of the type's hook."""

    parse: Check


def table(
    cls: type, check: TableCheck | None = None, omit: Iterable[str] = (), extra: Iterable[str] = ()
) -> None:
    """Declare how attrs class ``cls`` is read, before it is first structured.

    ``check(value, toml)`` sees the structured value and its TOML table and
    returns the value (perhaps changed); fields in ``omit`` are not TOML keys;
    keys in ``extra`` are, for ``check`` to read.
    """
    _TABLES[cls] = (check, frozenset(omit), frozenset(extra))


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Turn the first problem raised inside into a :class:`ConfigError` naming its key.

    Keys of the top-level table are named ``config.KEY`` when they are the problem.
    """
    try:
        yield
    except (Invalid, BaseValidationError) as e:
        path, message = _first_problem(e, ())
        text = "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)
        where = "config" + text if len(path) <= 1 else text.lstrip(".")
        raise ConfigError(f"{where}: {message}") from None


def _first_problem(error: BaseException, path: Path) -> tuple[Path, str]:
    if isinstance(error, Invalid):
        return path + error.path, error.message
    if isinstance(error, BaseValidationError):
        inner = error.exceptions[0]
        for note in getattr(inner, "__notes__", ()):
            if isinstance(note, AttributeValidationNote):
                return _first_problem(inner, (*path, note.name))
            if isinstance(note, IterableValidationNote):
                return _first_problem(inner, (*path, note.index))
        return _first_problem(inner, path)
    if isinstance(error, KeyError):  # cattrs: a field without a default is absent
        return path, "required key is missing"
    return path, str(error)


def at(step: str | int | Path, check: Check, value: Any) -> Any:
    """``check(value)``, its :class:`Invalid` placed under key (or index, or path) ``step``."""
    try:
        return check(value)
    except Invalid as e:
        raise Invalid(e.message, *(step if isinstance(step, tuple) else (step,)), *e.path) from None


# -- Checks for ``Annotated[T, ...]``


def rule(ok: Callable[[Any], bool], problem: str) -> Check:
    """A check refusing a value when ``ok(value)`` is false, with ``problem.format(value)``.

    ``problem`` is written by the code, never from the configuration's own text.
    """

    def check(value: Any) -> Any:
        if not ok(value):
            raise Invalid(problem.format(value))
        return value

    return check


def at_least(low: float) -> Check:
    return rule(lambda v: v >= low, f"must be at least {low}, got {{}}")


def at_most(high: float, why: str = "") -> Check:
    return rule(lambda v: v <= high, f"must be at most {high}{why}, got {{}}")


def between(low: float, high: float) -> Check:
    return rule(lambda v: low <= v <= high, f"must be between {low} and {high}, got {{}}")


def one_of(*choices: str) -> Check:
    allowed = " or ".join(f'"{c}"' for c in choices)
    return rule(lambda v: v in choices, f"expected {allowed}, got {{!r}}")


def each(check: Check) -> Check:
    """``check`` on every item of a tuple, a failure naming its index."""
    return lambda values: tuple(at(i, check, v) for i, v in enumerate(values))


def unique(values: Any) -> Any:
    for i, value in enumerate(values):
        if value in values[:i]:
            raise Invalid(f"{value!r} is listed twice", i)
    return values


positive = rule(lambda v: v > 0, "must be positive, got {}")
non_empty = rule(bool, "must not be empty")
#: A whole number of at least 1 (counts, sizes, limits).
PositiveInt = Annotated[int, at_least(1)]


#: Refuses anything but a TOML table.
a_table = rule(lambda v: isinstance(v, dict), "expected a table, got {!r}")


# -- Strict hooks: no coercion between TOML's types


def _strict(kind: type, name: str, ok: Callable[[Any], bool]) -> Callable[[Any, Any], Any]:
    check = rule(ok, f"expected {name}, got {{!r}}")
    return lambda value, _: kind(check(value))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _tuple_hook(kind: Any) -> Callable[[Any, Any], tuple[Any, ...]]:
    item = get_args(kind)[0]
    a_list = rule(
        lambda v: isinstance(v, list),
        f"expected {'an array of tables' if attrs.has(item) else 'a list'}, got {{!r}}",
    )
    return lambda value, _: tuple(structure(a_list(value), list[item]))  # type: ignore[valid-type]


def _annotated_hook(kind: Any) -> Callable[[Any, Any], Any]:
    base, *checks = get_args(kind)
    parse = checks.pop(0).parse if isinstance(checks[0], Raw) else None
    base_hook = None if parse else converter.get_structure_hook(base)

    def structure_checked(value: Any, _: Any) -> Any:
        value = parse(value) if parse else base_hook(value, base)  # type: ignore[misc]
        for check in checks:
            value = check(value)
        return value

    return structure_checked


def _attrs_hook(cls: type) -> Callable[[Any, Any], Any]:
    check, omit, extra = _TABLES.get(cls, (None, frozenset(), frozenset()))
    omitted: dict[str, Any] = {name: override(omit=True) for name in omit}
    generated: Callable[..., Any] = make_dict_structure_fn(cls, converter, **omitted)
    keys = {a.name for a in attrs.fields(cls)} - omit | extra

    def structure_table(value: Any, _: Any) -> Any:
        toml = a_table(value)
        for key in toml:
            if key not in keys:
                raise Invalid(f"unknown key (allowed: {', '.join(sorted(keys))})", key)
        result = generated({k: v for k, v in toml.items() if k not in extra}, cls)
        return check(result, toml) if check else result

    return structure_table


converter.register_structure_hook(int, _strict(int, "int", lambda v: type(v) is int))
converter.register_structure_hook(bool, _strict(bool, "true or false", lambda v: type(v) is bool))
converter.register_structure_hook(float, _strict(float, "a number", _number))
_text = _strict(str, "str", lambda v: isinstance(v, str))
converter.register_structure_hook(str, lambda value, _: non_empty(_text(value, str)))
converter.register_structure_hook_factory(
    lambda t: get_origin(t) is tuple and get_args(t)[1:] == (Ellipsis,), _tuple_hook
)
converter.register_structure_hook_factory(lambda t: get_origin(t) is Annotated, _annotated_hook)
converter.register_structure_hook_factory(attrs.has, _attrs_hook)
