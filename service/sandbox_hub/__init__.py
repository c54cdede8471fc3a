"""The sandbox hub: a Hub-compatible server on 127.0.0.1 for tests and the offline demo.

It is a Hub, not part of the bot: it imports nothing of ``service`` outside this folder and
nothing of ``merge_engine`` (``tests/test_import_graph.py`` checks), so it could live anywhere.
It stays under ``service/`` because the house's top level is the engine, the bot, the Space's
app and the tests. The bot reaches it only through ``HF_ENDPOINT``, like the real Hub: the demo
(``service.demo``) starts it and seeds it with the engine's example models, and the tests start
their own.
"""

from service.sandbox_hub.server import SandboxHub, SandboxServer
from service.sandbox_hub.store import HubStore

__all__ = ["HubStore", "SandboxHub", "SandboxServer"]
