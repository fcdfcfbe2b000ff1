"""Redaction: secret values, and values of credential-named keys, shown as `***` in whatever the
server serves (logs, `argument`, results, samples, error messages).

Two rules, both applied to served text, never to what a job receives:

1. **Known values.** The server knows the values it injects (every secret in SECRETS_DIR, the
   credential-named env_vars and model_args values of its jobs). Each is replaced wherever it
   appears, in the forms a program prints it in: as is, JSON-escaped, as a Python repr, URL-
   encoded, and each line of a multi-line value. A value a job transforms (hashes, slices,
   base64-encodes, prints with separators) is not recognised.
2. **Credential keys.** In `key=value`, `"key": "value"`, `'key': 'value'` and JSON objects, the
   value of a key named like a credential (`is_sensitive_key`) is masked whatever it is, and so
   is a password in a URL (`scheme://user:password@host`) and a `Bearer` token.

Pure functions (`redact_text`, `redact_json`, `redact_assignments`, `is_sensitive_key`) plus
`Redactor`, the server-wide set of known values, and `StreamRedactor`, which redacts a byte
stream read in chunks (a value split across two chunks is still found). Stdlib only.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, AnyStr, Generic
from urllib.parse import quote

MASK = "***"
MASK_BYTES = MASK.encode()

# Values learned from requests (credential-named env_vars, model_args) shorter than this are not
# treated as known values: placeholders such as "EMPTY", "none" or "dummy" would mask ordinary
# text (lm-eval's "acc,none"). Rule 2 still masks them where they stand under their key. Secrets
# from SECRETS_DIR are redacted whatever their length: the operator declared them secret.
MIN_LEARNED_CHARS = 8
# Values learned from requests longer than this are not learned (rule 2 still masks them where
# they stand under their key): it bounds what a caller can make every redaction cost.
MAX_LEARNED_CHARS = 256
# Pieces of a multi-line value (each line) shorter than this are not matched on their own.
MIN_PIECE_CHARS = 4
# Values learned from requests kept at most (oldest dropped first); secrets are never dropped.
MAX_LEARNED_VALUES = 1024
MAX_DEPTH = 64

# ------------------------------------------------------------------ rule 2: credential keys

# A key is split into words (`_`, `-`, `.`, spaces, camelCase); it names a credential when one of
# its words is one of these. `token` alone is ambiguous: lm-eval has text tokens as options
# (add_bos_token, custom_prefix_token_id, max_tokens), so it counts only when no other word says
# it is a text token.
CREDENTIAL_WORDS = frozenset(
    {
        "key",
        "apikey",
        "secret",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "credential",
        "credentials",
        "authorization",
        "auth",
        "token",
        "authtoken",
        "accesstoken",
        "apitoken",
        "secretkey",
        "accesskey",
        "privatekey",
        "bearer",
        "cookie",
    }
)
TEXT_TOKEN_WORDS = frozenset(
    {"bos", "eos", "pad", "unk", "sep", "cls", "mask", "prefix", "special", "stop", "id", "ids"}
)
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def key_words(key: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(key)]


def is_sensitive_key(key: str) -> bool:
    """True for keys such as api_key, apiKey, OPENAI_API_KEY, hf_token, token, auth_token,
    password, client_secret, Authorization; false for tokenizer, max_tokens, add_bos_token."""
    words = key_words(key)
    hits = [w for w in words if w in CREDENTIAL_WORDS]
    if not hits:
        return False
    return not (set(hits) == {"token"} and any(w in TEXT_TOKEN_WORDS for w in words))


_KEY = r"[A-Za-z_][A-Za-z0-9_.-]{0,100}"
# key=value: the value ends at a comma, whitespace, a quote or a closing bracket, or is quoted.
_ASSIGN = re.compile(
    rf"(?<![A-Za-z0-9_.])(?P<key>{_KEY})=(?P<val>\"[^\"\n]*\"|'[^'\n]*'|[^,\s'\"}}\]\)]+)"
)
# "key": "value" and 'key': 'value' (JSON, Python reprs); escapes inside the value are kept.
_QUOTED = re.compile(
    r"(?P<q>[\"'])(?P<key>[^\"'\n\\]{1,100})(?P=q)\s*:\s*"
    r"(?P<vq>[\"'])(?P<val>(?:\\.|(?!(?P=vq))[^\\\n])*)(?P=vq)"
)
_URL_PASSWORD = re.compile(r"(?P<head>://[^/\s:@'\"]+:)(?P<val>[^@\s/'\"]+)(?=@)")
_BEARER = re.compile(r"(?i)(?P<head>\bbearer\s+)(?P<val>[A-Za-z0-9._~+/=-]{4,})")


def _assignment(match: re.Match[str]) -> str:
    key, value = match["key"], match["val"]
    if is_sensitive_key(key):
        return f"{key}={MASK}"
    # Not a credential itself; its value may hold one (base_url=http://h/?key=abc).
    return f"{key}={redact_assignments(value)}"


def _quoted(match: re.Match[str]) -> str:
    if not is_sensitive_key(match["key"]):
        return match.group(0)
    start, end = match.span("val")
    whole = match.group(0)
    base = match.start()
    return whole[: start - base] + MASK + whole[end - base :]


def redact_assignments(text: str) -> str:
    """`text` with the values of credential-named keys masked (rule 2)."""
    if not text:
        return text
    text = _ASSIGN.sub(_assignment, text)
    text = _QUOTED.sub(_quoted, text)
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    return _BEARER.sub(lambda m: m["head"] + MASK, text)


def assignment_values(text: str) -> list[str]:
    """The values rule 2 masks in `text` (unquoted): what a job will receive under those keys,
    for the known values (rule 1) that catch them where they stand alone (e.g. a log line)."""
    found: list[str] = []
    for match in _ASSIGN.finditer(text):
        if is_sensitive_key(match["key"]):
            found.append(match["val"].strip("'\""))
        else:
            found += assignment_values(match["val"])
    for match in _QUOTED.finditer(text):
        if is_sensitive_key(match["key"]):
            found.append(match["val"])
    found += [m["val"] for m in _URL_PASSWORD.finditer(text)]
    found += [m["val"] for m in _BEARER.finditer(text)]
    return found


# ------------------------------------------------------------------ rule 1: known values


def value_forms(value: str) -> set[str]:
    """The ways a program commonly prints `value`: as is, JSON-escaped (ASCII or not), as a
    Python repr, URL-encoded, and each of its lines."""
    if not value:
        return set()
    forms = {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        repr(value)[1:-1],
        quote(value, safe=""),
    }
    if "\n" in value or "\r" in value:
        forms |= {p for p in re.split(r"\r?\n|\r", value) if len(p) >= MIN_PIECE_CHARS}
    return {f for f in forms if f}


def _trie_regex(words: Iterable[str]) -> str:
    """One regex alternation for `words`, shaped as a trie (shared prefixes are matched once)
    and preferring the longest word; iterative over chains, so long values are no problem."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        parts = []
        for char, child in sorted((c, n) for c, n in node.items() if c):
            chain = [char]
            while len(child) == 1 and "" not in child:
                ((nxt, child),) = child.items()
                chain.append(nxt)
            parts.append(re.escape("".join(chain)) + build(child))
        if not parts:
            return ""
        body = parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


# The regex covers the first PREFIX_CHARS of each value; a hit is confirmed by comparing the
# whole value. This bounds the regex (its size, its nesting: no value can make compiling it
# slow or recursive) whatever the values' length and number.
PREFIX_CHARS = 24


class _Matcher(Generic[AnyStr]):
    """Finds known values (longest first at a position) in str or bytes."""

    def __init__(self, forms: Iterable[AnyStr], to_regex: Callable[[list[AnyStr]], AnyStr]):
        self._by_prefix: dict[AnyStr, list[AnyStr]] = {}
        for form in forms:
            self._by_prefix.setdefault(form[:PREFIX_CHARS], []).append(form)
        for group in self._by_prefix.values():
            group.sort(key=len, reverse=True)
        # Longest prefixes first: a full-length prefix's group holds the longest values.
        self._lengths = sorted({len(p) for p in self._by_prefix}, reverse=True)
        self._regex = re.compile(to_regex(list(self._by_prefix)))

    def spans(self, text: AnyStr) -> Iterator[tuple[int, int]]:
        position = 0
        while (hit := self._regex.search(text, position)) is not None:
            start, end = hit.start(), None
            for length in self._lengths:
                if length > hit.end() - start:
                    continue
                for form in self._by_prefix.get(text[start : start + length], ()):
                    if text.startswith(form, start):
                        end = start + len(form)
                        break
                if end is not None:
                    break
            if end is None:
                position = start + 1
                continue
            yield start, end
            position = end

    def sub(self, mask: AnyStr, text: AnyStr) -> AnyStr:
        parts: list[AnyStr] = []
        position = 0
        for start, end in self.spans(text):
            parts += [text[position:start], mask]
            position = end
        if not parts:
            return text
        parts.append(text[position:])
        return text[:0].join(parts)


def _bytes_regex(prefixes: list[bytes]) -> bytes:
    # Bytes as latin-1 text: one char per byte, so the str trie becomes a bytes pattern.
    return _trie_regex(p.decode("latin-1") for p in prefixes).encode("latin-1")


class ValuePatterns:
    """Matchers for a set of values, over text and over UTF-8 bytes (each built when first
    used: text and bytes are needed by different routes)."""

    def __init__(self, values: Iterable[str]) -> None:
        forms = set()
        for value in values:
            forms |= value_forms(value)
        self.forms = forms
        self._encoded = {f.encode("utf-8", "surrogatepass") for f in forms}
        self.max_bytes = max((len(b) for b in self._encoded), default=0)
        self._by_first: dict[int, list[bytes]] = {}
        self._by_prefix: dict[bytes, list[bytes]] = {}
        for form in self._encoded:
            self._by_first.setdefault(form[0], []).append(form)
            self._by_prefix.setdefault(form[:PREFIX_CHARS], []).append(form)

    @functools.cached_property
    def text(self) -> _Matcher[str] | None:
        return _Matcher(self.forms, _trie_regex) if self.forms else None

    @functools.cached_property
    def bytes(self) -> _Matcher[bytes] | None:
        return _Matcher(self._encoded, _bytes_regex) if self._encoded else None

    def compile(self) -> None:
        _ = self.text, self.bytes

    def held_from(self, data: bytes) -> int:
        """Where the longest end of `data` that could begin a value starts (len(data): none)."""
        start = max(0, len(data) - self.max_bytes + 1)
        for index in range(start, len(data)):
            rest = data[index:]
            if len(rest) >= PREFIX_CHARS:
                forms = self._by_prefix.get(rest[:PREFIX_CHARS])
            else:
                forms = self._by_first.get(rest[0])
            if forms and any(len(f) > len(rest) and f.startswith(rest) for f in forms):
                return index
        return len(data)


def redact_text(text: str, values: Iterable[str] | ValuePatterns) -> str:
    """`text` with every known value (rule 1) replaced by `***`."""
    patterns = values if isinstance(values, ValuePatterns) else ValuePatterns(values)
    if not text or patterns.text is None:
        return text
    return patterns.text.sub(MASK, text)


def redact_bytes(data: bytes, values: Iterable[str] | ValuePatterns) -> bytes:
    patterns = values if isinstance(values, ValuePatterns) else ValuePatterns(values)
    if not data or patterns.bytes is None:
        return data
    return patterns.bytes.sub(MASK_BYTES, data)


def redact_json(obj: Any, values: Iterable[str] | ValuePatterns, depth: int = 0) -> Any:
    """A copy of `obj` (JSON data) with known values replaced in every string (keys too), and
    the value of every credential-named key masked (rule 2, also inside key=value strings such
    as lm-eval's `config.model_args`). Booleans and nulls under such keys stay as they are."""
    patterns = values if isinstance(values, ValuePatterns) else ValuePatterns(values)
    if depth > MAX_DEPTH:
        return MASK
    if isinstance(obj, str):
        return redact_assignments(redact_text(obj, patterns))
    if isinstance(obj, dict):
        out = {}
        for key, item in obj.items():
            new_key = redact_text(key, patterns) if isinstance(key, str) else key
            sensitive = isinstance(key, str) and is_sensitive_key(key)
            if sensitive and not (item is None or isinstance(item, bool | dict | list)):
                out[new_key] = MASK
            else:
                out[new_key] = redact_json(item, patterns, depth + 1)
        return out
    if isinstance(obj, list | tuple):
        return [redact_json(item, patterns, depth + 1) for item in obj]
    return obj


def redact_json_values(obj: Any, values: Iterable[str] | ValuePatterns, depth: int = 0) -> Any:
    """Rule 1 alone over JSON data (known values in every string, keys too): for what a job
    wrote, such as samples, where rule 2 would mask a dataset's own fields (ARC's answerKey)."""
    patterns = values if isinstance(values, ValuePatterns) else ValuePatterns(values)
    if depth > MAX_DEPTH:
        return MASK
    if isinstance(obj, str):
        return redact_text(obj, patterns)
    if isinstance(obj, dict):
        return {
            (redact_text(k, patterns) if isinstance(k, str) else k): redact_json_values(
                v, patterns, depth + 1
            )
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [redact_json_values(item, patterns, depth + 1) for item in obj]
    return obj


# ------------------------------------------------------------------ the server's known values


class Redactor:
    """The values this server has injected into jobs, for the server's lifetime: secrets (never
    dropped) and values learned from requests (at most MAX_LEARNED_VALUES, oldest dropped).

    Thread-safe: routes redact in worker threads while launches add values. `generation` grows
    with every change, so a cache of redacted text knows when to redo it.
    """

    def __init__(self, max_learned: int = MAX_LEARNED_VALUES) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._learned: dict[str, None] = {}  # insertion-ordered
        self._max_learned = max_learned
        self._patterns = ValuePatterns(())
        self._stale = False
        self.generation = 0

    def add_secrets(self, values: Iterable[str]) -> None:
        with self._lock:
            new = {v for v in values if v} - self._secrets
            if new:
                self._secrets |= new
                self._changed()

    def learn(self, values: Iterable[str]) -> None:
        """Values a request made a job receive (credential-named env_vars and model_args)."""
        with self._lock:
            new = [
                v
                for v in values
                if MIN_LEARNED_CHARS <= len(v) <= MAX_LEARNED_CHARS and v not in self._learned
            ]
            if not new:
                return
            for value in new:
                self._learned[value] = None
            while len(self._learned) > self._max_learned:
                del self._learned[next(iter(self._learned))]
            self._changed()

    def _changed(self) -> None:
        # Rebuilt when next used, not here: a burst of submissions costs one compilation.
        self._stale = True
        self.generation += 1

    @property
    def patterns(self) -> ValuePatterns:
        with self._lock:
            if self._stale:
                self._patterns = ValuePatterns(self._secrets | set(self._learned))
                self._stale = False
            return self._patterns

    @property
    def ready(self) -> bool:
        """True when redacting text compiles nothing (safe on the event loop)."""
        return not self._stale and "text" in self._patterns.__dict__

    def prepare(self) -> None:
        """Compiles the matchers now: call it in a worker thread before redacting on the event
        loop when not `ready` (compiling takes about a millisecond per known value)."""
        self.patterns.compile()

    def __bool__(self) -> bool:
        return bool(self.patterns.forms)

    def text(self, text: str | None) -> str | None:
        """Both rules: for `argument`, error messages and other short texts."""
        if text is None:
            return None
        return redact_assignments(redact_text(text, self.patterns))

    def values_only(self, text: str) -> str:
        """Rule 1 alone: for log lines, where rule 2 would mask a job's ordinary output."""
        return redact_text(text, self.patterns)

    def json(self, obj: Any) -> Any:
        return redact_json(obj, self.patterns)

    def json_values_only(self, obj: Any) -> Any:
        """Rule 1 alone over JSON data: for samples, as their raw file is served."""
        return redact_json_values(obj, self.patterns)

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)


class StreamRedactor:
    """Redacts a byte stream given in chunks: the end of a chunk that could be the start of a
    known value is held back until the next chunk (or `flush`) shows whether it is one."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._carry = b""

    def feed(self, data: bytes) -> bytes:
        buffer = self._carry + data
        patterns = self._redactor.patterns  # the current values, also for a long follow
        if patterns.bytes is None:
            self._carry = b""
            return buffer
        held = patterns.held_from(buffer)
        out: list[bytes] = []
        position = 0
        for start, end in patterns.bytes.spans(buffer):
            if start >= held:
                break
            out += [buffer[position:start], MASK_BYTES]
            position = end
        cut = max(held, position)
        out.append(buffer[position:cut])
        self._carry = buffer[cut:]
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._carry = self._carry, b""
        return redact_bytes(rest, self._redactor.patterns)

    def wrap(self, chunks: Iterable[bytes], flush: bool = True) -> Iterator[bytes]:
        """`chunks` redacted; `flush=False` keeps the held-back end for more chunks to come."""
        for chunk in chunks:
            if out := self.feed(chunk):
                yield out
        if flush and (rest := self.flush()):
            yield rest
