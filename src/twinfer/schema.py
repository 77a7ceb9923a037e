"""Parsed TOML into the configuration's attrs classes, by cattrs, with one-line errors.

The configuration modules (:mod:`twinfer.config`, :mod:`twinfer.taskconfig`)
declare each TOML table as a frozen attrs class whose fields are its keys.  A
field's type says what its key takes, strictly: TOML's ``true`` is not an
integer, ``"3"`` is not a number, a string is not a list, a table takes only
the keys its class declares.  ``Annotated`` adds checks on the value::

    queue_size: Annotated[int, at_least(1)] = 256

A check takes the structured value and returns it (perhaps normalised) or
raises :class:`Invalid`.  A leading :class:`Raw` parses the TOML value itself
instead of structuring it as the type (a lone number where a list is allowed).
:func:`table` adds a check on a whole table, for keys that depend on each other.

cattrs reports what went wrong as exception groups noting the attribute or
index each problem came from; :func:`load` follows them to the first problem
and raises one :class:`~twinfer.errors.ConfigError` naming its key path, as in
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
#: A key path: attribute names and list indices, outermost first.
Path = tuple[str | int, ...]


class Invalid(ValueError):
    """A value the configuration refuses; ``path`` leads from it to the bad key, if below."""

    def __init__(self, message: str, *path: str | int) -> None:
        super().__init__(message)
        self.message = message
        self.path: Path = path


@attrs.frozen
class Raw:
    """First in ``Annotated[...]``: ``parse`` takes the TOML value instead of the type's hook."""

    parse: Check


@attrs.frozen
class _Table:
    check: Callable[[Any, Mapping[str, Any]], Any] | None
    omit: frozenset[str]
    extra_keys: frozenset[str]


_TABLES: dict[type, _Table] = {}

#: Structures TOML values (and raises cattrs' exception groups); see :func:`load`.
converter = cattrs.Converter(detailed_validation=True)


def table(
    cls: type,
    check: Callable[[Any, Mapping[str, Any]], Any] | None = None,
    omit: Iterable[str] = (),
    extra_keys: Iterable[str] = (),
) -> None:
    """Declare how the table of attrs class ``cls`` is read, before it is first structured.

    ``check(value, table)`` sees the structured value and its TOML table and
    returns the value (perhaps changed); fields in ``omit`` are not TOML keys;
    ``extra_keys`` are TOML keys that ``check`` reads itself.
    """
    _TABLES[cls] = _Table(check, frozenset(omit), frozenset(extra_keys))


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Turn the first problem raised inside into a :class:`ConfigError` naming its key.

    Keys of the top-level table are named ``config.KEY`` when they are the problem.
    """
    try:
        yield
    except (Invalid, BaseValidationError) as e:
        path, message = _first_problem(e, ())
        raise ConfigError(f"{key_path(path)}: {message}") from None


def key_path(path: Path) -> str:
    """``("models", 1, "detect")`` as ``models[1].detect``."""
    text = "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)
    return "config" + text if len(path) <= 1 else text.lstrip(".")


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


# --------------------------------------------------------------------------
# Checks for ``Annotated[T, ...]``


def rule(ok: Callable[[Any], bool], problem: str) -> Check:
    """A check refusing a value when ``ok(value)`` is false, with ``problem.format(value)``."""

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


positive = rule(lambda v: v > 0, "must be positive, got {}")
non_empty = rule(bool, "must not be empty")


def each(check: Check) -> Check:
    """``check`` on every item of a tuple, a failure naming its index."""
    return lambda values: tuple(at(i, check, v) for i, v in enumerate(values))


def unique(values: Any) -> Any:
    for i, value in enumerate(values):
        if value in values[:i]:
            raise Invalid(f"{value!r} is listed twice", i)
    return values


#: A whole number of at least 1 (counts, sizes, limits).
PositiveInt = Annotated[int, at_least(1)]


def structure(value: Any, kind: type[T]) -> T:
    """``value`` as ``kind``, strictly; raises cattrs' errors or :class:`Invalid`."""
    return converter.structure(value, kind)


# --------------------------------------------------------------------------
# Strict hooks: no coercion between TOML's types


def _strict(kind: type, name: str, ok: Callable[[Any], bool]) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _: Any) -> Any:
        if not ok(value):
            raise Invalid(f"expected {name}, got {value!r}")
        return kind(value)

    return structure


def _str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected str, got {value!r}")
    return non_empty(value)  # type: ignore[no-any-return]


def a_table(value: Any) -> Mapping[str, Any]:
    """``value``, refused unless it is a TOML table."""
    if not isinstance(value, dict):
        raise Invalid(f"expected a table, got {value!r}")
    return value


def _tuple_hook(kind: Any) -> Callable[[Any, Any], tuple[Any, ...]]:
    item = get_args(kind)[0]
    as_list = list[item]  # type: ignore[valid-type]
    what = "an array of tables" if attrs.has(item) else "a list"

    def structure(value: Any, _: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise Invalid(f"expected {what}, got {value!r}")
        return tuple(converter.structure(value, as_list))

    return structure


def _annotated_hook(kind: Any) -> Callable[[Any, Any], Any]:
    base, *checks = get_args(kind)
    parse = checks.pop(0).parse if checks and isinstance(checks[0], Raw) else None
    base_hook = converter.get_structure_hook(base) if parse is None else None

    def structure(value: Any, _: Any) -> Any:
        value = parse(value) if parse is not None else base_hook(value, base)  # type: ignore[misc]
        for check in checks:
            value = check(value)
        return value

    return structure


def _attrs_hook(cls: type) -> Callable[[Any, Any], Any]:
    spec = _TABLES.get(cls, _Table(None, frozenset(), frozenset()))
    omitted: dict[str, Any] = {name: override(omit=True) for name in spec.omit}
    generated: Callable[..., Any] = make_dict_structure_fn(cls, converter, **omitted)
    keys = {a.name for a in attrs.fields(cls)} - spec.omit | spec.extra_keys

    def structure(value: Any, _: Any) -> Any:
        toml = a_table(value)
        for key in toml:
            if key not in keys:
                raise Invalid(f"unknown key (allowed: {', '.join(sorted(keys))})", key)
        fields = {k: v for k, v in toml.items() if k not in spec.extra_keys}
        result = generated(fields, cls)
        return spec.check(result, toml) if spec.check else result

    return structure


def _is_homogeneous_tuple(kind: Any) -> bool:
    args = get_args(kind)
    return get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


converter.register_structure_hook(int, _strict(int, "int", lambda v: type(v) is int))
converter.register_structure_hook(bool, _strict(bool, "true or false", lambda v: type(v) is bool))
converter.register_structure_hook(float, _strict(float, "a number", _number))
converter.register_structure_hook(str, _str)
converter.register_structure_hook_factory(_is_homogeneous_tuple, _tuple_hook)
converter.register_structure_hook_factory(lambda t: get_origin(t) is Annotated, _annotated_hook)
converter.register_structure_hook_factory(attrs.has, _attrs_hook)
