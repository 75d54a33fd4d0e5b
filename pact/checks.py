"""Checks of setting values shared by every layer: numbers within bounds, memory sizes; each failure an
`InvalidSetting` naming the setting, so a command line can name its flag and a YAML file its key.
"""

from __future__ import annotations

import math
import re

import torch

from pact.errors import InvalidSetting


def check_setting(field: str, value, low: float | None = None, high: float | None = None, *,
                  low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Raise `InvalidSetting` naming `field` unless `value` is a finite number (an int with `integer`) within the bounds.

    `low`/`high` are inclusive unless `low_open`/`high_open`. One check for
    every numeric setting, so the messages read alike: `lr must be a finite
    number > 0, got nan`.
    """
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    expected = " ".join(filter(None, ["an integer" if integer else "a finite number", " and ".join(bounds)]))
    number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    valid = number and math.isfinite(value) and (
        low is None or (value > low if low_open else value >= low)) and (
        high is None or (value < high if high_open else value <= high))
    if not valid:
        raise InvalidSetting(field, f"{field} must be {expected}, got {value!r}")


_UNITS = {"": 2**30, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str, name: str = "gpu_memory") -> int:
    """Bytes of a memory size such as `24GiB`, `80GB`, `16000MiB` or `24` (GiB); `InvalidSetting` naming the setting
    `name` otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise InvalidSetting(name, f"{name} must be a memory size such as 24GiB, 80GB or 16000MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def check_device(field: str, value) -> None:
    """Raise `InvalidSetting` naming `field` unless `value` is `auto` or a torch device name (`cpu`, `cuda`, `cuda:1`)."""
    try:
        valid = isinstance(value, str) and (value == "auto" or torch.device(value) is not None)
    except RuntimeError:
        valid = False
    if not valid:
        raise InvalidSetting(field, f"{field} must be auto, cpu, cuda or cuda:N, got {value!r}")
