"""Range checks of settings (pattern parameters, decode budgets, options), shared by every layer of the package.

Settings often come from JSON (plan files, vLLM options), where ``true``/``false`` parse as Python bools (a subclass
of int) and integers have no size limit. Every check here refuses bools where a number is expected and bounds
integers, so a bad value fails when the setting is made, with its name, never later in torch or a kernel.
"""

from __future__ import annotations

import math

__all__ = ["MAX_COUNT", "MAX_BLOCK_SIZE", "check_int", "check_real", "shown"]

#: Largest token count, block count, stride or budget a setting may hold: 2**31 - 1 (int32), so every length,
#: position and product derived from it fits the kernels' index types and no arithmetic on it overflows int64.
MAX_COUNT = 2**31 - 1
#: Largest mask block size (tokens): the C++ and CUDA kernels size their per-block scratch by it.
MAX_BLOCK_SIZE = 1024


def shown(value, limit: int = 80) -> str:
    """``repr(value)`` for an error message: huge integers by their size, long text cut short."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    try:
        text = repr(value)
    except ValueError:  # e.g. an int beyond Python's digit limit inside a container
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int(name: str, value, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {shown(value)}")
    if value > maximum:
        raise ValueError(f"{name} must be an int in [{minimum}, {maximum}], got {shown(value)}")
    return value


def check_real(name: str, value, low: float, high: float, *, low_open: bool = False,
               high_open: bool = False) -> float:
    """``value`` if it is a finite int or float (not a bool) in the interval from ``low`` to ``high`` (ends
    excluded where ``*_open``), else ValueError naming ``name`` and the interval."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and (isinstance(value, int) or math.isfinite(value))
          and (low < value if low_open else low <= value) and (value < high if high_open else value <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {shown(value)}")
    return value
