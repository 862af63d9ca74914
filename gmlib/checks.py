"""Checks for config dataclasses: each field's value against its annotation, and ranges.

A config's own validate() (or __post_init__) calls these once, so a notebook parameter, a YAML
file and a script's -s option all get the same message, naming the field and what it needs:
`DataConfig.workers='two': expected int` rather than a TypeError three calls deeper.
"""
import numbers
import types
import typing
from dataclasses import fields


def _accepts(tp, value) -> bool:
    """Whether `value` fits the annotation `tp` (an int for a float is fine; a bool is not an int here)."""
    if tp is typing.Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(t, value) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is not None:  # list[str], dict[str, float]: the container is checked, not its items
        tp = origin
    if tp is float:  # numbers.*: numpy scalars count too
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp in (list, tuple):
        return isinstance(value, (list, tuple))  # YAML has no tuples
    return isinstance(value, tp) if isinstance(tp, type) else True


def _name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_types(cfg, label: str):
    """Raise ValueError naming the first field whose value does not fit its annotation."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        tp = hints.get(f.name, typing.Any)
        if not _accepts(tp, v):
            raise ValueError(f"{label}.{f.name}={v!r}: expected {_name(tp)}, got {type(v).__name__}")


def at_least(cfg, label: str, **minimum):
    """Raise ValueError for the first field below its minimum (at_least(cfg, "X", workers=1))."""
    for k, lo in minimum.items():
        if getattr(cfg, k) < lo:
            raise ValueError(f"{label}.{k}={getattr(cfg, k)!r}: must be >= {lo}")


def fractions(cfg, label: str, *names):
    """Raise ValueError for the first field outside [0, 1] (a share, a ratio, a threshold)."""
    for k in names:
        if not 0.0 <= getattr(cfg, k) <= 1.0:
            raise ValueError(f"{label}.{k}={getattr(cfg, k)!r}: must be a fraction in [0, 1]")


def in_range(value, label: str, lo, hi, why: str = ""):
    """Raise ValueError unless lo <= value <= hi (value already of the right type)."""
    if not lo <= value <= hi:
        raise ValueError(f"{label}={value!r}: must be in [{lo}, {hi}]" + (f" ({why})" if why else ""))
