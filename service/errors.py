"""What the service refuses beyond the engine's errors, each with the HTTP status the API
answers with. Like every :class:`~merge_engine.errors.MergeError`, ``str()`` is one sentence
for the person who asked; ``field`` names the part of the request it is about, if any.

    ServiceError          400  a request the bot will not take as it is
    ├── SignInRequired    401  the action needs a signed request
    ├── TokenRefused      401  the Hub does not accept the token
    ├── NotAllowed        403  signed in, but not as the one who may do this
    ├── NotFound          404  no such job or follow, or not one the asker may see
    ├── TooLarge          413  the request body is over the limit
    ├── QueueLimitError   429  the requester's queue is full
    ├── HubUnavailable    503  the Hub cannot be reached or answers too slowly
    └── DiskFull          507  the job's sources and output do not fit the disk now
"""

from __future__ import annotations

from merge_engine.errors import MergeError


class ServiceError(MergeError):
    status = 400

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


class SignInRequired(ServiceError):
    status = 401


class TokenRefused(ServiceError):
    status = 401


class NotAllowed(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class TooLarge(ServiceError):
    status = 413


class QueueLimitError(ServiceError):
    """The requester already has as many jobs waiting as the bot allows."""

    status = 429


class HubUnavailable(ServiceError):
    status = 503


class DiskFull(ServiceError):
    """The disk of the work dir has no room for the job now (see ``service.disk``)."""

    status = 507
