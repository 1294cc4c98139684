"""Read the YAML data tables that emlib ships (sentence tables, the persona world's language) and check their shape.

A loader walks its document with a :class:`Location` and the checks below; any mistake (a typo in a key, a missing
key, a string where a list belongs, an unknown ``{slot}`` in a template) raises :class:`TableError` naming the file and
the key path, e.g. ``data/narrow/tables/medical.yaml: topics[3].claims[1].bad: expected a string, got a list``.
"""

from __future__ import annotations

import string
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from emlib import paths

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads the tables about 10x faster


class TableError(ValueError):
    """A data file that does not have the shape its loader expects; the message names the file and the key."""


@dataclass(frozen=True)
class Location:
    """A file and a key path inside it: ``Location(file) / "topics" / 3`` reads ``file: topics[3]``."""

    file: str
    keys: tuple[str | int, ...] = ()

    def __truediv__(self, key: str | int) -> Location:
        return Location(self.file, self.keys + (key,))

    def __str__(self) -> str:
        key_path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in self.keys).lstrip(".")
        return f"{self.file}: {key_path}" if key_path else self.file

    def error(self, message: str) -> TableError:
        return TableError(f"{self}: {message}")


def read_yaml(path: str | Path) -> tuple[object, Location]:
    """The parsed document and its root :class:`Location` (the path shown relative to the repository when inside it)."""
    path = Path(path)
    try:
        shown = str(path.resolve().relative_to(paths.REPO_ROOT))
    except ValueError:
        shown = str(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader), Location(shown)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is None:
            raise TableError(f"{shown}: not valid YAML: {err}") from None
        problem = getattr(err, "problem", None) or "syntax error"
        where = f"{shown}: line {mark.line + 1}, column {mark.column + 1}"
        raise TableError(f"{where}: not valid YAML: {problem}") from None


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def mapping(value: object, where: Location, required: Iterable[str] = (), optional: Iterable[str] = (),
            any_keys: bool = False) -> dict:
    """``value`` as a mapping with string keys: exactly ``required`` plus any of ``optional`` (or any keys)."""
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping, got {_kind(value)}")
    for key in value:
        if not isinstance(key, str):
            raise where.error(f"key {key!r} is not a string")
    if not any_keys:
        required, optional = list(required), list(optional)
        unknown = [k for k in value if k not in required and k not in optional]
        if unknown:
            raise (where / unknown[0]).error(f"unknown key; expected {' / '.join(required + optional)}")
        missing = [k for k in required if k not in value]
        if missing:
            raise where.error(f"missing key {missing[0]!r}")
    return value


def text(value: object, where: Location) -> str:
    """``value`` as a non-empty string."""
    if not isinstance(value, str):
        raise where.error(f"expected a string, got {_kind(value)}")
    if not value.strip():
        raise where.error("empty string")
    return value


def texts(value: object, where: Location, allow_empty: bool = False) -> tuple[str, ...]:
    """``value`` as a tuple of non-empty strings (at least one unless ``allow_empty``)."""
    if not isinstance(value, list):
        raise where.error(f"expected a list of strings, got {_kind(value)}")
    if not value and not allow_empty:
        raise where.error("empty list")
    return tuple(text(item, where / i) for i, item in enumerate(value))


def number(value: object, where: Location) -> float:
    """``value`` as a number (an int stays an int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"expected a number, got {_kind(value)}")
    return value


def slot_names(template: str, where: Location | None = None) -> list[str]:
    """The ``{slot}`` names in ``template`` in order (repeats included), as ``str.format`` reads them."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:  # a lone brace
        raise (where or Location("template")).error(f"{err} in {template!r}") from None


def check_slots(template: str, allowed: Collection[str], where: Location) -> str:
    """``template`` unchanged, after checking that every ``{slot}`` in it is one of ``allowed``."""
    for name in slot_names(template, where):
        if name not in allowed:
            expected = ", ".join("{" + a + "}" for a in sorted(allowed)) if allowed else "no slots"
            raise where.error(f"unknown slot {{{name}}} in {template!r}; expected {expected}")
    return template
