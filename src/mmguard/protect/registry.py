"""Protection methods by name."""

from __future__ import annotations

import dataclasses

from mmguard.errors import MMGuardError
from mmguard.protect.base import MethodSettings, ProtectionMethod
from mmguard.protect.em import ErrorMinimizing
from mmguard.protect.mem import MultiStepErrorMinimizing
from mmguard.protect.mmguard import MMGuard
from mmguard.protect.random_noise import RandomNoise
from mmguard.protect.uap import ErrorMaximizing

METHODS: dict[str, type[ProtectionMethod]] = {
    cls.name: cls for cls in (RandomNoise, ErrorMinimizing, ErrorMaximizing,
                              MultiStepErrorMinimizing, MMGuard)
}


def create_method(name: str, settings: MethodSettings,
                  given: frozenset[str] | None = None) -> ProtectionMethod:
    """Build a method.

    `given` names the options a command-line user set explicitly: an option
    the method does not use is then an error rather than silently ignored
    (`--surrogate` on `random` would suggest a protection that is not
    happening), and options left out take the method's own defaults. Without
    `given` (the Python API), `settings` is used exactly as passed.
    """
    if name not in METHODS:
        raise MMGuardError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    cls = METHODS[name]
    if given is None:
        return cls(settings)
    unused = sorted(given - cls.uses - {"eps", "seed"})
    if unused:
        raise MMGuardError(f"method {name!r} does not use "
                           + ", ".join("--" + option.replace("_", "-") for option in unused))
    defaults = {option: value for option, value in cls.defaults.items() if option not in given}
    return cls(dataclasses.replace(settings, **defaults))
