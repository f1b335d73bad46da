"""
The URLs of HTTP-invoked functions: every valid form parsed once into what the
security checks and the connection need.

``parse_url(url) -> TargetUrl``:

- IPv6 literals (``http://[::1]:8080/x``) give the canonical address (``::1``) as
  host; the request's ``Host`` header keeps the brackets. Zone ids
  (``[fe80::1%25eth0]``) are not supported (an invalid URL).
- IPv4 addresses in any form the C library's ``inet_aton`` reads (``127.1``,
  ``0x7f.0.0.1``, ``2130706433``: what a resolver would turn into an address) give the
  dotted quad, so the private-address check sees the real address.
- Internationalized host names (``bücher.example``) give their IDNA 2008 / UTS 46
  ASCII form (``xn--bcher-kva.example``); an ASCII name is lower-cased.
- Ports: explicit, else 80/443 by scheme; a port outside 0..65535 is an invalid URL.

``TargetUrl.request_url`` is the URL to hand to treq: fully ASCII (path and query
percent-encoded), of a class whose ``to_uri()`` is itself, because hyperlink's
``to_uri()`` runs IDNA over an IPv6 host and fails (``Codepoint U+003A ... not
allowed``; the bug this module exists for).
"""

import ipaddress
import re
import socket
from urllib.parse import unquote, urlsplit

import idna
from hyperlink import EncodedURL

_NUMERIC_V4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$")
_PLACEHOLDER = "placeholder.invalid"


class InvalidUrl(ValueError):
    """The URL cannot be parsed or has no usable host."""


class _AsciiURL(EncodedURL):
    """An already encoded URL: treq's ``to_uri()`` leaves it as it is."""

    def to_uri(self):
        return self


class TargetUrl:
    """
    @ivar scheme: ``http`` or ``https``.
    @ivar host: ASCII host: a lower-case name, a dotted quad, or an IPv6 address
        without brackets.
    @ivar port: int.
    @ivar is_ip: True when C{host} is an address.
    @ivar request_url: the URL for treq (see the module docstring).
    """

    __slots__ = ("scheme", "host", "port", "is_ip", "request_url")

    def __init__(self, scheme, host, port, is_ip, request_url):
        self.scheme = scheme
        self.host = host
        self.port = port
        self.is_ip = is_ip
        self.request_url = request_url


def canonical_host(host):
    """
    @param host: a URL's host as written (brackets already removed).
    @return: C{(ascii_host, is_ip)}.
    @raise InvalidUrl: for a host that is not a name or an address.
    """
    host = unquote(host).strip()
    if not host:
        raise InvalidUrl("no host")
    if ":" in host:
        address, _, zone = host.partition("%")
        try:
            ip = ipaddress.IPv6Address(address)
        except ValueError:
            raise InvalidUrl("bad IPv6 address")
        return (str(ip) + ("%" + zone if zone else "")), True
    lowered = host.lower()
    if _NUMERIC_V4.match(lowered):
        try:
            return socket.inet_ntoa(socket.inet_aton(lowered)), True
        except OSError:
            raise InvalidUrl("bad IPv4 address")
    try:
        lowered.encode("ascii")
        ascii_host = lowered
        if "xn--" in ascii_host:
            idna.decode(ascii_host)  # a malformed A-label is an invalid URL
    except UnicodeEncodeError:
        ascii_host = None
    except idna.IDNAError:
        raise InvalidUrl("bad IDNA host")
    if ascii_host is None:
        try:
            ascii_host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise InvalidUrl("bad IDNA host")
    if any(c in ascii_host for c in "/\\@?#[] \t"):
        raise InvalidUrl("bad host")
    return ascii_host, False


def canonical_pattern(pattern):
    """
    An allowlist glob in the form hosts are compared in: brackets dropped from IPv6,
    addresses canonical, non-ASCII labels IDNA-encoded, lower case.
    """
    pattern = pattern.strip().lower()
    if pattern.startswith("[") and pattern.endswith("]"):
        pattern = pattern[1:-1]
    try:
        return str(ipaddress.ip_address(pattern))
    except ValueError:
        pass
    labels = []
    for label in pattern.split("."):
        try:
            label.encode("ascii")
            labels.append(label)
        except UnicodeEncodeError:
            try:
                labels.append(idna.alabel(label).decode("ascii"))
            except (idna.IDNAError, UnicodeError):
                labels.append(label)
    return ".".join(labels)


def parse_url(url):
    """
    @return: a L{TargetUrl}.
    @raise InvalidUrl: when C{url} is not an http(s) URL with a usable host and port.
    """
    if not isinstance(url, str) or any(c in url for c in "\r\n\x00"):
        raise InvalidUrl("not a string")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        netloc_host = parts.netloc.rpartition("@")[2]
    except ValueError:
        raise InvalidUrl("bad URL")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidUrl("not http or https")
    if netloc_host.startswith("["):
        raw_host = netloc_host[1:netloc_host.find("]")] if "]" in netloc_host else ""
    else:
        raw_host = parts.hostname or ""
    host, is_ip = canonical_host(raw_host)
    if port is None:
        port = 443 if scheme == "https" else 80
    try:
        parsed = EncodedURL.from_text(url.strip())
        # Encode path and query with hyperlink, with a host it can IDNA-encode, then
        # put the real (already ASCII) host back.
        encoded = parsed.replace(host=_PLACEHOLDER).to_uri().replace(
            scheme=scheme, host=host)
        request_url = _AsciiURL.from_text(encoded.to_text(with_password=True))
    except (ValueError, UnicodeError, idna.IDNAError):
        raise InvalidUrl("bad URL")
    return TargetUrl(scheme, host, port, is_ip, request_url)
