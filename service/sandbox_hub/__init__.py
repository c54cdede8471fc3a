"""The sandbox hub: a Hub-compatible server on 127.0.0.1 for tests and the offline demo."""

from service.sandbox_hub.server import SandboxHub, SandboxServer
from service.sandbox_hub.store import HubStore

__all__ = ["HubStore", "SandboxHub", "SandboxServer"]
