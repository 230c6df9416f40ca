"""Command-line value types shared by `orpheus-triton` and the benchmarks under perf/.

Each is an argparse ``type``: a bad value is refused while the arguments are parsed, with what was
expected, before a server starts or a benchmark spends minutes on the steps before the one that
would have failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import math

from .constants import DEFAULT_GRPC_URL, max_tokens_refusal


def positive(value: str) -> int:
    """A whole number >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number


def max_tokens(value: str) -> int:
    """A request's max_tokens, in the range the server takes (``constants.max_tokens_refusal``)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if (refusal := max_tokens_refusal(number)) is not None:
        raise argparse.ArgumentTypeError(refusal)
    return number


def max_tokens_or_zero(value: str) -> int:
    """0 (each request its own default) or a request's max_tokens (``max_tokens``)."""
    return 0 if value.strip() == "0" else max_tokens(value)


def non_negative(value: str) -> int:
    """A whole number >= 0 (0 usually meaning "the default" or "off")."""
    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return int(value)


def non_negative_seconds(value: str) -> float:
    """Seconds >= 0, fractions allowed."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value!r}")
    return seconds


def positive_seconds(value: str) -> float:
    """Seconds > 0, fractions allowed."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {value!r}")
    return seconds


def counts(value: str) -> list[int]:
    """Comma-separated whole numbers >= 1, at least one: stream counts, concurrency levels."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1, comma-separated (e.g. 1,8,32), got {value!r}")
    return [int(part) for part in parts]


def rates(value: str) -> list[float]:
    """Comma-separated numbers > 0 (arrival rates a second); empty: none."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        numbers = [0.0]
    if not all(0 < number < math.inf for number in numbers):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, comma-separated (e.g. 0.5,2), or nothing, "
                                         f"got {value!r}")
    return numbers


def check_grpc_url(value: str) -> str:
    """``value`` if it names a server's gRPC endpoint as HOST:PORT (or one of gRPC's other target forms: a
    Unix socket, a scheme://); ValueError saying what is expected otherwise. Caught here, not by gRPC: an
    http:// URL (the HTTP server's form) failed as a 'Misformatted domain name', and a host without a port
    went to port 443."""
    if value.lower().startswith(("http://", "https://")) or ":" not in value:
        raise ValueError(f"expected the gRPC endpoint as HOST:PORT, e.g. {DEFAULT_GRPC_URL} "
                         f"(no http://: the server's gRPC port, not its HTTP one), got {value!r}")
    if (target := grpc_host_port(value)) is None:
        return value
    host, port = target
    if not host or not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"expected HOST:PORT with a port from 1 to 65535, e.g. {DEFAULT_GRPC_URL}, got {value!r}")
    if _is_ipv6(host):  # unbracketed, its last group and the port cannot be told apart
        raise ValueError(f"an IPv6 address goes in brackets before its port, e.g. [::1]:8001, got {value!r}")
    return value


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host.split("%")[0]), ipaddress.IPv6Address)
    except ValueError:
        return False


# gRPC's target forms other than HOST:PORT that need no "//" (grpc/doc/naming.md).
_GRPC_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:", "xds:")


def grpc_host_port(target: str) -> tuple[str, str] | None:
    """(host, port) of a gRPC target of the HOST:PORT form, the port as written; None for gRPC's other
    target forms (a Unix socket, a scheme such as dns: or ipv4:), which are taken as they are."""
    if "://" in target or target.startswith(_GRPC_SCHEMES):
        return None
    host, _, port = target.rpartition(":")
    return host, port


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default, where its own text does not already say it.

    argparse's ArgumentDefaultsHelpFormatter appends the default to every option, also to those
    whose help explains it in words, and to none that has no help text.
    """

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._shows_default(action):  # argparse formats no help of an option without any
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not self._shows_default(action):
            return text
        return f"{text} (default: %(default)s)"

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default  # by identity: 0 and 0.0 are defaults worth showing, False is not
        return bool(action.option_strings) and not (default is None or default is False or default == ""
                                                      or default is argparse.SUPPRESS)
