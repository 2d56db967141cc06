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
                  given: frozenset[str] = frozenset()) -> ProtectionMethod:
    """Build a method; `given` names the options the user set explicitly.

    An option the method does not use is an error rather than silently
    ignored: `--surrogate` on `random` would suggest a protection that is not
    happening.
    """
    if name not in METHODS:
        raise MMGuardError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    cls = METHODS[name]
    unused = sorted(given - cls.uses - {"eps", "seed"})
    if unused:
        raise MMGuardError(f"method {name!r} does not use "
                           + ", ".join("--" + option.replace("_", "-") for option in unused))
    defaults = {option: value for option, value in cls.defaults.items() if option not in given}
    return cls(dataclasses.replace(settings, **defaults))
