"""Checks shared by every config section (jax-free: configs load without jax)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn

import numpy as np


def is_int(x: Any) -> bool:
    """An integer config value (a Python or numpy int; a bool is not one)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A real config value (int or float; a bool is not one)."""
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def fail(key: str, value: Any, why: str) -> NoReturn:
    """Raises the one-line error of a bad config value: `key=value why`."""
    raise ValueError(f"{key}={value!r} {why}")


def check_keys(section: Any, known: Iterable[str], name: str, moved: dict | None = None) -> None:
    """Rejects a key of `section` that the section does not have; `moved` maps an old key to
    the one that replaced it, named in the error."""
    known = set(known)
    for key in section.keys():
        if moved and key in moved:
            fail(f"{name}.{key}", section[key], f"was replaced by {moved[key]}; set that instead")
        if key not in known:
            fail(
                f"{name}.{key}",
                section[key],
                f"is not a key of the {name} section; known: {sorted(known)}",
            )
