"""Protection methods by name: adding a method is one file in `methods/` and one line here."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

from mmguard.errors import MMGuardError
from mmguard.protect.base import ProtectionMethod
from mmguard.protect.methods.class_pattern import ClassPattern
from mmguard.protect.methods.cluster_em import ClusterErrorMinimizing
from mmguard.protect.methods.em import ErrorMinimizing
from mmguard.protect.methods.mem import MultiStepErrorMinimizing
from mmguard.protect.methods.mmguard_binding import MMGuard
from mmguard.protect.methods.random_noise import RandomNoise
from mmguard.protect.methods.shift_pattern import ShiftPattern
from mmguard.protect.methods.uap import ErrorMaximizing
from mmguard.protect.methods.word_code import WordCode
from mmguard.protect.methods.wrong_target import WrongTarget

METHODS: dict[str, type[ProtectionMethod]] = {
    RandomNoise.name: RandomNoise,
    ErrorMinimizing.name: ErrorMinimizing,
    ErrorMaximizing.name: ErrorMaximizing,
    MultiStepErrorMinimizing.name: MultiStepErrorMinimizing,
    MMGuard.name: MMGuard,
    WrongTarget.name: WrongTarget,
    ClusterErrorMinimizing.name: ClusterErrorMinimizing,
    ClassPattern.name: ClassPattern,
    ShiftPattern.name: ShiftPattern,
    WordCode.name: WordCode,
}


def register_method(cls: type[ProtectionMethod]) -> type[ProtectionMethod]:
    """Add a method under its `name` (usable as a class decorator)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise MMGuardError(f"a method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[ProtectionMethod]:
    if name not in METHODS:
        raise MMGuardError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def create_method(name: str, kind: str | None = None, *, strict: bool = True,
                  **options: Any) -> ProtectionMethod:
    """Build a method from its name and options (the fields of its `Config`).

    Options left out take the method's defaults. With `strict` (the command
    line), an option the method does not have is an error rather than silently
    ignored (`--surrogate` on `random` would suggest a protection that is not
    happening); `strict=False` drops them (one set of options for several
    methods). `kind` is the data the run protects ("pairs" or "triples").
    """
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unused = sorted(set(options) - fields)
    if unused and strict:
        raise MMGuardError(f"method {name!r} does not use "
                           + ", ".join("--" + option.replace("_", "-") for option in unused))
    options = {key: value for key, value in options.items() if key in fields}
    check_options(name, options)
    config = cls.Config(**options)
    if kind is not None and kind not in cls.kinds:
        raise MMGuardError(f"method {name!r} protects {' or '.join(cls.kinds)}, not {kind}")
    return cls(config, kind)


def parse_options(name: str, assignments: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """["pgd_steps=40", "surrogates=lit"] -> typed values for the method's Config fields."""
    fields = {f.name: f for f in dataclasses.fields(method_class(name).Config)}
    options: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise MMGuardError(f"{assignment!r}: expected OPTION=VALUE with an option of "
                               f"{name} ({', '.join(sorted(fields))})")
        default = fields[key].default
        kind = fields[key].metadata.get("type") or type(default)
        if isinstance(default, tuple):
            options[key] = tuple(part.strip() for part in text.split(",") if part.strip())
        elif isinstance(default, bool):
            options[key] = text.strip().lower() in ("1", "true", "yes", "on")
        elif kind in (int, float, "eps"):
            try:
                options[key] = (float(Fraction(text)) if kind == "eps" or "/" in text
                                else kind(text))
            except ValueError:
                raise MMGuardError(f"{assignment!r}: {key} takes a number") from None
        else:
            options[key] = text
    check_options(name, options)
    return options


def check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse values outside a Config field's declared `choices` or `min`/`max`, so the
    Python API and `lab --set` keep the limits the command line enforces."""
    fields = {f.name: f for f in dataclasses.fields(method_class(name).Config)}
    for key, value in options.items():
        metadata = fields[key].metadata
        choices = metadata.get("choices")
        if choices and value not in choices:
            raise MMGuardError(f"{name}: {key}={value!r} is not one of {', '.join(choices)}")
        low, high = metadata.get("min"), metadata.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                (low is not None and value < low) or (high is not None and value > high)):
            raise MMGuardError(f"{name}: {key}={value!r} must lie in "
                               f"[{'' if low is None else low}, {'' if high is None else high}]")
