"""Who may use the console, decided without I/O: sessions, cross-site checks, names.

A sign-in gives a session cookie ``<name>.<issued>.<mac>``, where the MAC is an HMAC of the
name and issue time keyed by ``[console] token``: the cookie never carries the token, it
expires after ``session_hours``, and changing the token signs everybody out. Every form
carries a CSRF value derived from the session the same way (and the cookie is
``SameSite=Strict``), so a page elsewhere cannot post as a signed-in agent; a request whose
``Origin`` is another site is refused as well. Scripts send ``Authorization: Bearer
<token>`` instead (no cookie, nothing a browser adds by itself: no CSRF value needed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import unicodedata
from typing import Literal
from urllib.parse import urlsplit

import attrs

COOKIE = "pipeline_console"
#: the name the console gives a person answering from the business phone itself
PHONE = "phone"
MAX_NAME_CHARS = 40


@attrs.frozen
class Agent:
    """Who acts: a signed-in agent (``via="session"``) or a script (``via="bearer"``)."""

    name: str
    via: Literal["session", "bearer"]
    session: str = ""  # the cookie value (the CSRF value is derived from it)


def _mac(token: str, *parts: str) -> str:
    digest = hmac.new(token.encode(), "\x00".join(parts).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode()


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot sign in, or None. Names show in the history, so they are short,
    printable, and not the one the console uses for the phone."""
    if not name.strip():
        return "give your name: it shows beside your replies and notes"
    if len(name) > MAX_NAME_CHARS:
        return f"a name has at most {MAX_NAME_CHARS} characters"
    if any(unicodedata.category(c)[0] == "C" for c in name):
        return "a name cannot contain control characters"
    if name.strip().casefold() == PHONE:
        return f"{PHONE!r} is how the console names the business phone: choose another name"
    return None


def make_session(token: str, name: str, issued: int) -> str:
    encoded = base64.urlsafe_b64encode(name.strip().encode()).decode().rstrip("=")
    return f"{encoded}.{issued}.{_mac(token, 'session', encoded, str(issued))}"


def read_session(token: str, value: str, now: float, lifetime_s: float) -> str | None:
    """The agent's name if ``value`` is a session of ``token`` that has not expired."""
    encoded, _, rest = value.partition(".")
    issued, _, mac = rest.partition(".")
    if not (encoded and issued.isdigit() and mac):
        return None
    if not hmac.compare_digest(mac, _mac(token, "session", encoded, issued)):
        return None
    if not 0 <= now - int(issued) < lifetime_s:
        return None
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def csrf_value(token: str, session: str) -> str:
    return _mac(token, "csrf", session)


def token_ok(given: str, token: str) -> bool:
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def bearer(authorization: str) -> str | None:
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def cookie(header: str, name: str = COOKIE) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether a request's ``Origin`` (absent: not a cross-site browser request) is the site
    it was sent to."""
    if origin is None:
        return True
    if host is None or origin == "null":
        return False
    return urlsplit(origin).netloc.lower() == host.lower()


def local_client(host: str | None) -> bool:
    """Whether a client address is this machine (loopback)."""
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def may_act(holder: str | None, agent: str) -> bool:
    """An agent acts on an escalation nobody has claimed, that they claimed, or that the
    phone holds (the one who replies from the console then takes it)."""
    return holder is None or holder in (agent, PHONE)
