"""Human sizes ("32M", "1G", "0x2000000") to bytes and back."""

from .errors import UserError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str | int, what: str = "size") -> int:
    if isinstance(text, int):
        return text
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if raw.startswith("0X"):
            return int(raw, 16)
        unit = raw[-1] if raw and raw[-1] in _UNITS else ""
        number = raw[: len(raw) - len(unit)]
        value = float(number) * _UNITS[unit]
    except (ValueError, IndexError):
        raise UserError(f"{what}: cannot read {text!r} as a size (examples: 512M, 1G, 0x2000000)") from None
    if value < 0 or value != int(value):
        raise UserError(f"{what}: {text!r} is not a whole, positive number of bytes")
    return int(value)


def format_size(value: int) -> str:
    for unit in ("G", "M", "K"):
        if value and value % _UNITS[unit] == 0:
            return f"{value // _UNITS[unit]}{unit}"
    return str(value)
