"""URLs compared the way an HTTP client will use them (MODEL_URL_PREFIXES,
WEBHOOK_URL_PREFIXES)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_url(url: str, what: str) -> str:
    """scheme://host:port/path/ with the scheme and host lower-cased, the port explicit and a
    trailing slash; a URL with user info, a query, a fragment, a backslash, whitespace or
    control characters is refused (tricks like `http://allowed@evil/` hide the real host)."""
    normal = request_url(url, what)
    return normal if normal.endswith("/") else normal + "/"


def request_url(url: str, what: str) -> str:
    """The URL a client will request: `normalise_url` without the added trailing slash, so a
    URL checked against prefixes in its normal form is sent in that same form."""
    if any(ch.isspace() or ord(ch) < 32 or ch == "\\" for ch in url):
        raise ValueError(f"{what}: {url!r} contains whitespace, control characters or '\\'")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{what}: {url!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{what}: {url!r} must be an http:// or https:// URL with a host")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{what}: {url!r} must not carry user info, a query or a fragment")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    port = port if port is not None else _DEFAULT_PORTS[scheme]
    path = parts.path or "/"
    if ".." in path.split("/") or "." in path.split("/") or "%" in path:
        raise ValueError(f"{what}: {url!r}: the path must not contain '.', '..' or escapes")
    return urlunsplit((scheme, f"{host}:{port}", path, "", ""))


def url_allowed(url: str, prefixes: list[str], what: str = "base_url") -> bool:
    """True if `url` (normalised) starts with one of the normalised `prefixes` at a path
    segment boundary."""
    normal = normalise_url(url, what)
    return any(normal.startswith(prefix) for prefix in prefixes)
