"""Pure rules for the HTTP boundary: which Host a request may name, which requests a browser
sent on another site's behalf, and how a redirect's Location drops the Host.

No I/O here; security.HttpGuardMiddleware applies these to every request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

# Always answered to: a browser reaches these only from this machine, and a DNS rebinding
# attacker cannot make a browser send them for the attacker's own domain.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Addresses that mean "every interface": not a name any client sends.
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# GET URLs the original README documents for stopping jobs: side effects despite the method.
# Matched at the end of the path so a mount prefix (root_path) changes nothing.
_SIDE_EFFECT_GET = re.compile(r"/(?:job/[^/]+/(?:stop|dequeue)|jobs/(?:stop|dequeue))/*$")
# A DNS name or an IPv4 address; IPv6 literals are checked by ipaddress.
_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]{0,252})$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class HostRule:
    """One ALLOWED_HOSTS entry: a host (or `*.suffix`), and a port when the entry names one."""

    host: str
    port: int | None = None
    subdomains: bool = False

    def matches(self, host: str, port: int | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.subdomains:
            return host.endswith("." + self.host)
        return host == self.host


def split_host(value: str) -> tuple[str, int | None] | None:
    """`name[:port]`, `1.2.3.4[:port]` or `[v6][:port]` -> (lower-case host, port); None when
    the value is not a host at all (a path, credentials, spaces, an empty name)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            return None
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        if value.count(":") > 1:  # a bare IPv6 literal, as in ALLOWED_HOSTS=::1
            try:
                return ipaddress.IPv6Address(value).compressed, None
            except ValueError:
                return None
        host, sep, after = value.partition(":")
        port_text = after if sep else None
        host = host.removesuffix(".")  # `localhost.` is the same name, fully qualified
        if not _NAME.match(host):
            return None
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    return host, port


def parse_rules(entries: Iterable[str]) -> list[HostRule] | None:
    """ALLOWED_HOSTS entries -> rules; None means `*` (no check). Raises ValueError, naming the
    entry, for one that is not a host."""
    rules: list[HostRule] = []
    for entry in entries:
        if entry.strip() == "*":
            return None
        subdomains = entry.strip().startswith("*.")
        parsed = split_host(entry.strip()[2:] if subdomains else entry)
        if parsed is None:
            raise ValueError(
                f"ALLOWED_HOSTS entry {entry!r} is not a host name or IP address "
                "(examples: eval.example.com, 10.0.0.5:8000, [::1], *.example.com, *)"
            )
        rules.append(HostRule(parsed[0], parsed[1], subdomains))
    return rules


def default_entries(bound_host: str) -> list[str]:
    """Loopback names, plus the address the server is bound to unless it means 'all'."""
    entries = list(LOOPBACK_NAMES)
    if bound_host.strip("[]") not in WILDCARD_BINDS:
        entries.append(bound_host)
    return entries


def host_allowed(header: str | None, rules: list[HostRule] | None) -> bool:
    if rules is None:
        return True
    parsed = split_host(header) if header else None
    if parsed is None:
        return False
    return any(rule.matches(*parsed) for rule in rules)


def is_state_changing(method: str, path: str) -> bool:
    """Everything but a plain read, including the README's GET stop URLs."""
    return method.upper() not in SAFE_METHODS or bool(_SIDE_EFFECT_GET.search(path))


def _same_authority(url: str, host_header: str) -> bool:
    try:
        parts = urlsplit(url)
        url_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return False
    own = split_host(host_header)
    theirs = split_host(parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]")
    if own is None or theirs is None or own[0] != theirs[0]:
        return False
    default = _DEFAULT_PORTS[parts.scheme]
    return (url_port or default) == (own[1] or default)


def cross_site_reason(headers: dict[str, str], host_header: str) -> str | None:
    """Why a browser sent this request on another site's behalf, or None when it did not.

    Browsers mark requests with Sec-Fetch-Site (all current ones) and Origin (on every POST,
    and on cross-origin fetches); older ones only with Referer. curl, httpx and the CLI send
    none of these, so they pass.
    """
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        # `same-site` is another origin too: another port on localhost is `same-site`.
        return f"Sec-Fetch-Site: {site}"
    origin = headers.get("origin")
    if origin is not None:
        if not _same_authority(origin, host_header):
            return f"Origin {origin!r} is not this server ({host_header!r})"
        return None
    referer = headers.get("referer")
    if site is None and referer and not _same_authority(referer, host_header):
        return f"Referer from another site ({host_header!r} expected)"
    return None


def relative_location(location: str) -> str:
    """A Location without scheme and host, so no redirect repeats what the client put in Host.

    A path that starts with `//` or `/\\` would read as another host: collapse it to one `/`.
    """
    parts = urlsplit(location)
    path = parts.path or "/"
    if parts.scheme or parts.netloc or path.startswith(("//", "/\\")):
        path = "/" + path.lstrip("/\\")
    return path + (f"?{parts.query}" if parts.query else "")
