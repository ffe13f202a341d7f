"""URL normalisation and the 64-bit hashes users and URLs are counted by (pure).

Shared by ingest (which computes them once per event and carries them in a header) and
the worker (for records produced straight to Kafka)."""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Generic, TypeVar

from xxhash import xxh3_64_intdigest

T = TypeVar("T")

MAX_URL_CHARS = 200       # a normalised URL is cut to this many (ASCII) characters

# scheme :// [user info @] host[:port] path [?query] [#fragment]
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(?:[^/?#]*@)?([^/?#]*)([^?#]*)(\?[^#]*)?")
_DEFAULT_PORT = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}
# Percent-encode everything but printable ASCII, and the two characters JSON escapes:
# the normalised text is ASCII without control characters, one byte per character in JSON.
_ENCODE = {c: f"%{c:02X}" for c in [*range(0x21), 0x22, 0x5C, 0x7F]}
_NEEDS_ENCODING = re.compile(r'[^\x21\x23-\x5b\x5d-\x7e]')
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def percent_encode(text: str) -> str:
    """``text`` with every character but printable ASCII (and ``"``, ``\\``) percent-encoded as UTF-8."""
    if _NEEDS_ENCODING.search(text) is None:
        return text
    return "".join(_ENCODE.get(ord(ch), ch) if ord(ch) < 0x80 else "".join(f"%{b:02X}" for b in ch.encode())
                   for ch in text)


def normalise_url(url: str, keep_query: bool = False) -> str | None:
    """The form a URL is counted under in ``top_urls`` (None: nothing to count).

    * surrounding whitespace is dropped; an empty URL is None;
    * the fragment (``#...``) is always dropped, the query string (``?...``) unless
      ``keep_query``;
    * with a scheme (``https://Example.COM:443/A``): scheme and host lower-cased (but for
      letters whose lower case has ASCII in it: the KELVIN SIGN stays), user info (``user:pw@``) and the scheme's
      default port (80, 443) dropped, an empty path becomes ``/`` ->
      ``https://example.com/A``; the path keeps its case;
    * without one (``/home``, ``home``): the path as given;
    * existing percent-escapes get upper-case hex digits (``%c3%bc`` -> ``%C3%BC``, RFC 3986
      6.2.2.1); characters other than printable ASCII (and ``"``, ``\\``, spaces) are
      percent-encoded as UTF-8 (so ``ü`` and ``%c3%bc`` are one URL);
    * the result is cut to ``MAX_URL_CHARS`` characters, never within an escape or within
      the escapes of one UTF-8 character (a sender's own escapes are not checked).
    """
    u = url.strip()
    m = _ABSOLUTE.match(u)
    if m is not None:
        scheme, host, path, query = m.groups()
        scheme, host = scheme.lower(), host.lower() if host.isascii() else _lower_host(host)
        port = _DEFAULT_PORT.get(scheme)
        if port is not None and host.endswith(port):
            host = host[:-len(port)]
        u = f"{scheme}://{host}{path or '/'}{query if keep_query and query else ''}"
    else:
        cut = u.find("#")
        if cut >= 0:
            u = u[:cut]
        if not keep_query:
            cut = u.find("?")
            if cut >= 0:
                u = u[:cut]
    # every character gives at least one of the result: what lies beyond would be cut anyway
    # (a long URL costs no more than a short one: a worker reads URLs of any length from Kafka)
    u = u[:MAX_URL_CHARS + 1]
    if "%" in u:
        u = _ESCAPE.sub(_upper, u)
    u = percent_encode(u)
    if len(u) > MAX_URL_CHARS:
        u = u[:MAX_URL_CHARS]
        pct = u.rfind("%", MAX_URL_CHARS - 2)
        if pct >= 0:  # no escape cut in half
            u = u[:pct]
        u = _whole_utf8(u)
    return u or None


def _lower_host(host: str) -> str:
    """``host`` lower-cased, but for a letter whose lower case has ASCII in it: ``MÜNCHEN``
    and ``münchen`` are one host, while the KELVIN SIGN (lower case ``k``) and ``İ`` (``i``
    and a dot) stay as they are, never folded onto another host's ASCII letters."""
    out: list[str] = []
    for ch in host:
        low = ch.lower()
        out.append(low if ch.isascii() or not any(c.isascii() for c in low) else ch)
    return "".join(out)


def _upper(m: re.Match[str]) -> str:
    return m.group().upper()


def _whole_utf8(u: str) -> str:
    """``u`` without the escapes, at its end, of a UTF-8 character cut short (``%C3`` of
    ``%C3%A9``): the text of a cut URL still decodes."""
    end = len(u)
    i = end
    while i >= 3 and u[i - 3] == "%" and end - i < 12 and _ESCAPE.fullmatch(u, i - 3, i) is not None:
        b = int(u[i - 2:i], 16)
        i -= 3
        if b < 0x80:  # ASCII: nothing of a longer character follows it
            return u
        if b >= 0xC0:  # a lead byte: its character needs 2, 3 or 4 bytes
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return u if (end - i) // 3 >= need else u[:i]
    return u


def url_parts(url: str, keep_query: bool = False) -> tuple[int | None, str | None]:
    """(:func:`url_hash`, text) of the URL's :func:`normalise_url` form, or (None, None)
    when it has none to count."""
    text = normalise_url(url, keep_query)
    return (None, None) if text is None else (xxh3_64_intdigest(text.encode()), text)


class UrlCache(Generic[T]):
    """``parts(url)`` -> ``compute(url)``, remembered per raw URL of at most ``max_chars``
    characters, at most ``max_entries`` of them (emptied when full): a lookup costs ~0.1 us,
    normalising a URL 1-4 us, and a site has far fewer pages than events.  So it stays
    within a few MB whatever producers send.  Per-event loops read ``known`` inline and
    call ``parts`` on a miss.  The worker keeps :func:`url_parts` of URLs produced straight
    to Kafka, ingest the URL part of its agg header."""

    __slots__ = ("compute", "max_entries", "max_chars", "known")

    def __init__(self, compute: Callable[[str], T], max_entries: int = 16384, max_chars: int = 256) -> None:
        self.compute = compute
        self.max_entries = max_entries
        self.max_chars = max_chars
        self.known: dict[str, T] = {}

    def parts(self, url: str) -> T:
        known = self.known.get(url)
        if known is None:
            known = self.compute(url)
            if len(url) <= self.max_chars:
                if len(self.known) >= self.max_entries:
                    self.known.clear()  # the same dict: loops holding ``known`` see it
                self.known[url] = known
        return known


# hash64 of ``text`` is hash_bytes(text.encode()): for per-event loops that save the call
hash_bytes = xxh3_64_intdigest


def hash64(text: str) -> int:
    """A 64-bit hash of ``text`` (XXH3-64 of its UTF-8), the same in every process and on
    every machine.  xxhash: about 0.15 us a call against 1.4 us for an 8-byte BLAKE2b (in
    the per-event path of ingest, and of the worker for records produced straight to Kafka)."""
    return xxh3_64_intdigest(text.encode())


def user_hash(user_id: str) -> int:
    """The hash unique users are counted by."""
    return hash64(user_id)


def url_hash(normalised_url: str) -> int:
    """The hash a URL is counted under: of its :func:`normalise_url` form."""
    return hash64(normalised_url)


class UrlEntry:
    """A counted URL as the worker's decoder keeps it for records produced straight to Kafka
    (one per URL hash): its hash and normalised text, and ``n``, its events in the cell batch
    ``count_parts`` call ``gen`` is counting (a count an event without a dict look-up)."""

    __slots__ = ("h", "text", "gen", "n")

    def __init__(self, h: int, text: str) -> None:
        self.h = h  # -1: a URL with nothing to count (NO_URL)
        self.text = text
        self.gen = 0
        self.n = 0


NO_URL = UrlEntry(-1, "")  # what the decoder's URL cache keeps for a URL with nothing to count


class Parts:
    """What an event of a record produced straight to Kafka adds to its cell's aggregates:
    its user hash and URL (None: none).  An agg (core.contract) like the tuple of parts."""

    __slots__ = ("user", "url")

    def __init__(self, user: int | None, url: UrlEntry | None) -> None:
        self.user = user
        self.url = url

    def as_tuple(self) -> tuple[int | None, int | None, str | None]:
        """(user hash, url hash, url), as ``parse_agg_header`` gives them."""
        url = self.url
        return (self.user, None, None) if url is None else (self.user, url.h, url.text)

    def __eq__(self, other: object) -> bool:  # equal to Parts and to tuples of the same parts
        return self.as_tuple() == (other.as_tuple() if isinstance(other, Parts) else other)

    __hash__ = None  # type: ignore[assignment]  # compared by value, and its entry counts: no dict key

    def __repr__(self) -> str:
        return f"Parts{self.as_tuple()!r}"


class _Gen:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


_GEN = _Gen()  # count_parts' calls, in this process: a UrlEntry's ``gen`` says which counted it


def count_parts(parts: list[Parts]) -> tuple[list[int], dict[int, int], dict[int, bytes | str]]:
    """(user hashes in order, url hash -> events, url hash -> its text) of a cell batch's
    parts: each event's URL counted in its entry (``UrlEntry.n``, for this call's ``gen``),
    one dict write per distinct URL of the batch, not a look-up and a write per event."""
    gen = _GEN.n = _GEN.n + 1
    users: list[int] = []
    touched: list[UrlEntry] = []
    for p in parts:
        user = p.user
        if user is not None:
            users.append(user)
        e = p.url
        if e is not None:
            if e.gen != gen:
                e.gen = gen
                e.n = 1
                touched.append(e)
            else:
                e.n += 1
    urls: dict[int, int] = {}
    texts: dict[int, bytes | str] = {}
    for e in touched:  # in the order of their first events; entries of one hash summed
        n = urls.get(e.h)
        if n is None:
            urls[e.h] = e.n
            texts[e.h] = e.text
        else:
            urls[e.h] = n + e.n
    return users, urls, texts
