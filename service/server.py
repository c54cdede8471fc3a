"""Starting the bot in one process: its Hub (the real one, or the demo's sandbox hub when there
is no token), the job engine (DBOS, with or without an in-process worker), the clock, and one
web server for the JSON API and the Space's UI. ``spaces_app.py`` and ``mergebot serve`` both
start it this way."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import replace

from service.settings import Settings

MOCK_OAUTH_TOKEN = "mock-oauth-token-for-local-dev"
"""The token Gradio's local OAuth mock hands to handlers off Spaces."""


def quiet_libraries() -> None:
    """Workers report progress in the job table; the libraries' own bars would flood logs."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def start_demo_hub(settings: Settings, port: int) -> Settings:
    """The offline demo: the sandbox hub with example models, the bot's user on it, and the
    local sign-in mapped to the demo user."""
    # HF_ENDPOINT is read when huggingface_hub is first imported: it must be set before that.
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("huggingface_hub was imported before the sandbox hub was chosen")
    url = f"http://127.0.0.1:{port}"
    os.environ["HF_ENDPOINT"] = url
    quiet_libraries()
    from service.demo import BOT_USER, DEMO_USER, TOKENS_FILE, example_repo_ids, start_demo_hub

    hub_folder = settings.work_dir / "sandbox-hub"
    server, tokens = start_demo_hub(hub_folder, port)
    server.hub.users[MOCK_OAUTH_TOKEN] = DEMO_USER
    print(
        f"no HF_TOKEN: sandbox hub on {url} with example models "
        f"{', '.join(example_repo_ids(DEMO_USER))}; the {DEMO_USER} user's token is in {hub_folder / TOKENS_FILE}",
        flush=True,
    )
    return replace(
        settings,
        endpoint=url,
        bot_token=tokens[BOT_USER],
        bot_namespace=BOT_USER,
        local_login_token=tokens[DEMO_USER],
    )


NO_TOKEN_ON_A_SPACE = (
    "error: this Space has no HF_TOKEN secret, and without it mergebot would serve its local demo "
    "hub, which visitors cannot reach; add the bot account's write token as the secret HF_TOKEN "
    "in the Space's settings and restart it"
)
"""Why a deployed Space (``SPACE_ID`` set) without a token refuses to start."""


def start_bot(hub_port: int, run_jobs: bool = True):
    """Settings from the environment, the demo hub if needed, the job engine and the clock."""
    settings = Settings.from_env()
    if settings.bot_token is None and os.environ.get("SPACE_ID"):
        raise SystemExit(NO_TOKEN_ON_A_SPACE)
    if settings.bot_token is None:
        settings = start_demo_hub(settings, hub_port)
    else:
        quiet_libraries()
    from service.intake.clock import start_clock
    from service.intake.jobs import JobService
    from service.workflows.worker import start_dbos

    service = JobService(settings.for_role("serve"))
    start_dbos(service, run_jobs=run_jobs)
    start_clock(service)
    return service


@contextlib.contextmanager
def local_login_as(token: str | None) -> Iterator[None]:
    """Off Spaces, Gradio's OAuth mock signs everyone in as the owner of ``HF_TOKEN`` — here the
    bot. While the app is built, point it at the local user's token instead (the demo user,
    or ``MERGEBOT_LOCAL_LOGIN_TOKEN``); on a Space real OAuth applies and nothing changes."""
    if not token or os.environ.get("SPACE_ID"):
        yield
        return
    saved = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = saved


def _local_login_name(service) -> str:
    """Whom the local sign-in stand-in signs in as (the Hub is asked once, and may be down)."""
    from merge_engine.errors import MergeError

    settings = service.settings
    try:
        return service.identities.of(settings.local_login_token or settings.bot_token).name
    except MergeError:
        return "the owner of MERGEBOT_LOCAL_LOGIN_TOKEN, else of HF_TOKEN"


def run_web(service, build_blocks, host: str, port: int) -> None:
    """Serve the JSON API and, at ``/``, the UI that ``build_blocks(service)`` makes, until stopped."""
    import gradio as gr
    import uvicorn

    from service.api.app import create_app

    with local_login_as(service.settings.local_login_token), warnings.catch_warnings():
        # Gradio warns (twice) that OAuth is mocked off Spaces; one line below says what it does
        warnings.filterwarnings("ignore", message="Gradio does not support OAuth features")
        blocks = build_blocks(service)
        app = gr.mount_gradio_app(create_app(service), blocks, path="", ssr_mode=False)
    if not os.environ.get("SPACE_ID"):
        print(
            "off Spaces the page's 'Sign in with Hugging Face' button is a local stand-in for the Hub's sign-in: "
            f"it signs you in as {_local_login_name(service)}",
            flush=True,
        )
    print(
        f"mergebot serving on http://{host}:{port} (jobs in {service.settings.database_url.split('://')[0]}), worker {service.settings.worker_id}",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
