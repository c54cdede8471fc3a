"""Who a token belongs to, asked of the Hub at most once per token per ``ttl`` seconds.

The Hub rate-limits whoami strictly, and an API that asked it on every signed request would
stall behind a slow Hub. Answers are kept under a hash of the token (never the token itself),
a refused token is remembered too (for a shorter time), and the call has its own timeout: a Hub
that does not answer in time is a :class:`~service.errors.HubUnavailable`, not a hung request.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from service.errors import HubUnavailable, ServiceError, TokenRefused
from service.intake.request import Identity

REFUSED_TTL = 60.0
"""Seconds a token the Hub refused stays refused without asking again."""


def _key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class _Known:
    name: str
    orgs: tuple[str, ...]


class Identities:
    def __init__(self, endpoint: str, ttl: float, timeout: float, max_entries: int = 10_000):
        self.endpoint, self.ttl, self.timeout = endpoint, ttl, timeout
        self.max_entries = max_entries
        self._known: OrderedDict[str, tuple[float, _Known | ServiceError]] = OrderedDict()
        self._lock = threading.Lock()

    def known(self, token: str | None) -> Identity | None:
        """The identity ``token`` proves, if that is known without asking the Hub."""
        if not token:
            return Identity()
        with self._lock:
            expires, known = self._known.get(_key(token), (0.0, None))
        if known is None or expires < time.monotonic():
            return None
        if isinstance(known, ServiceError):
            raise known
        return Identity(name=known.name, token=token, orgs=known.orgs)

    def of(self, token: str | None) -> Identity:
        """The identity ``token`` proves; anonymous without a token."""
        found = self.known(token)
        if found is not None:
            return found
        answer = self._ask(token)
        ttl = min(self.ttl, REFUSED_TTL) if isinstance(answer, TokenRefused) else self.ttl
        key = _key(token)
        with self._lock:
            self._known[key] = (time.monotonic() + ttl, answer)
            self._known.move_to_end(key)
            while len(self._known) > self.max_entries:
                self._known.popitem(last=False)
        if isinstance(answer, TokenRefused):
            raise answer
        return Identity(name=answer.name, token=token, orgs=answer.orgs)

    def _ask(self, token: str) -> _Known | TokenRefused:
        """Ask the Hub; an outage raises (and is not remembered), a refusal is returned."""
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        try:
            response = get_session().get(
                f"{self.endpoint}/api/whoami-v2",
                headers=build_hf_headers(token=token),
                timeout=self.timeout,
            )
            hf_raise_for_status(response)
            info = response.json()
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status == 401:
                return TokenRefused(
                    "the Hub does not accept this token; sign in again or create a new token"
                )
            raise HubUnavailable(
                f"the Hub answered {status} when checking the token; try again in a minute"
            ) from None
        except Exception as error:  # noqa: BLE001  (transport errors differ between client versions)
            raise HubUnavailable(
                f"could not reach the Hub at {self.endpoint} within {self.timeout:g} s to check the token ({type(error).__name__}); try again in a minute"
            ) from None
        orgs = tuple(org["name"] for org in info.get("orgs", []) if "name" in org)
        return _Known(name=info["name"], orgs=orgs)
