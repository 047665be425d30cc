"""The command line's value parsers: each turns one argument's text into its value, or
raises `argparse.ArgumentTypeError` saying what it expected (argparse exits 2 with it)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

__all__ = [
    "assignment", "duration_seconds", "float_list", "int_at_least", "int_list", "knots",
    "non_negative_float", "target",
]


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 100,200; got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 0.1,0.01; got {text!r}") from None


def knots(text: str) -> list[tuple[int, float]]:
    knots: list[tuple[int, float]] = []
    for item in (v for v in text.split(",") if v.strip()):
        step, sep, lr = item.partition(":")
        try:
            if not sep:
                raise ValueError(item)
            knots.append((int(step), float(lr)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected STEP:LR pairs, e.g. 0:0.0,100:0.1; got {item!r}"
            ) from None
    return knots


#: gRPC name-resolver schemes: a target that starts with one goes to gRPC as it is.
_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def target(text: str) -> str:
    """`--target`: HOST:PORT (an IPv6 host in brackets) or a gRPC target such as unix:PATH.
    Without a port, gRPC would dial port 443 and report only "unavailable"."""
    if text.startswith(_TARGET_SCHEMES):
        return text
    source = " (from $LRCTL_TARGET)" if text == os.environ.get("LRCTL_TARGET") else ""
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"use HOST:PORT, not a URL, e.g. localhost:50051; got {text!r}{source}"
        )
    host, _, port = text.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a port from 1 to 65535, e.g. localhost:50051, "
            f"[::1]:50051 or unix:PATH; got {text!r}{source}"
        )
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(
            f"put an IPv6 host in brackets, e.g. [::1]:50051; got {text!r}{source}"
        )
    return text


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


#: `lrctl pause --timeout`'s units.
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> float:
    """A duration such as 90s, 30m, 1.5h or 7d (a bare number: seconds), > 0."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a duration > 0 such as 90s, 30m, 1h or 7d; got {text!r}")
    return seconds


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse




def assignment(text: str) -> tuple[str, float]:
    """NAME=VALUE of `set-param`."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. momentum=0.9), got {text!r}") from None
