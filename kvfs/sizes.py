"""Human sizes: parse "64M", "1.5GiB", "4096" and format bytes for tables."""
from __future__ import annotations

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace("IB", "").replace(" ", "")
    if s.endswith("B") and len(s) > 1 and not s[-2].isdigit():
        s = s[:-1]
    num = s.rstrip("KMGTPB")
    unit = s[len(num):]
    bad = ValueError(f"not a size: {text!r} (use e.g. 4096, 64M, 1.5G)")
    if unit not in _UNITS or not num:
        raise bad
    try:
        value = float(num) * _UNITS[unit]
    except ValueError:
        raise bad from None
    if value < 0:
        raise ValueError(f"size must be >= 0: {text!r}")
    return int(value)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_AGE = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """Seconds of "90s", "30m", "12h", "7d", "2w" or a plain number of seconds."""
    s = text.strip().lower()
    unit = s[-1:] if s[-1:] in _AGE else "s"
    num = s[:-1] if s[-1:] in _AGE else s
    try:
        value = float(num) * _AGE[unit]
    except ValueError:
        raise ValueError(f"not an age: {text!r} (use e.g. 3600, 30m, 12h, 7d)") from None
    if value < 0:
        raise ValueError(f"an age must be >= 0: {text!r}")
    return value
