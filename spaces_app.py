"""The Space: the merge form, sign-in, live jobs — and the bot behind them, in one process.

On a Space (``app_file: spaces_app.py``) or locally with ``python spaces_app.py``: starts the
job engine with its worker and clock (the sandbox hub with example models when there is no
``HF_TOKEN``), builds the Blocks and serves them at ``/`` beside the JSON API at ``/api``.
Listens on ``GRADIO_SERVER_NAME``:``GRADIO_SERVER_PORT`` (127.0.0.1:7860 by default; Spaces
set 0.0.0.0).
"""

from __future__ import annotations

import os

from service.server import run_web, start_bot


def main() -> None:
    service = start_bot(hub_port=int(os.environ.get("MERGEBOT_SANDBOX_PORT", 7861)))
    # after start_bot: it may set HF_ENDPOINT for the demo
    from service.space.ui import build_blocks

    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    run_web(service, build_blocks, host, int(os.environ.get("GRADIO_SERVER_PORT", 7860)))


if __name__ == "__main__":
    main()
