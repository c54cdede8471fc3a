"""Everything the service is configured with, read once from environment variables.

| variable | meaning | default |
|---|---|---|
| `HF_TOKEN` | the bot's own token; it writes only to the bot's namespace | none: `serve` runs the sandbox hub (a deployed Space, `SPACE_ID` set, refuses to start) |
| `HF_ENDPOINT` | the Hub to talk to | `https://huggingface.co` |
| `MERGEBOT_NAMESPACE` | where requests without a token of their own are pushed | the bot token's user |
| `MERGEBOT_WORK_DIR` | jobs' downloads and outputs, the SQLite file, the key file | `./mergebot-data` |
| `MERGEBOT_DATABASE_URL` | `sqlite:///…` or `postgresql://…` (several workers, several machines) | a SQLite file in the work dir |
| `MERGEBOT_SECRET_KEY` | Fernet key that encrypts requesters' tokens at rest | a key file in the work dir (SQLite only) |
| `MERGEBOT_WORKER_ID` | this worker's stable id: a restart under the same id resumes its jobs | `<host>-worker0` |
| `MERGEBOT_DEVICE` | `auto`, `cpu` or `cuda` | `auto` |
| `MERGEBOT_MAX_MODELS`, `MERGEBOT_MAX_SOURCE_GB`, `MERGEBOT_MAX_QUEUED` | limits per request and queued jobs per requester | 8, 100, 3 |
| `MERGEBOT_DISK_MARGIN_GB` | disk the bot keeps free in the work dir: a job whose sources and output do not fit beside it is refused at submit (507), or fails before its download on a worker | 5 |
| `MERGEBOT_LOCAL_LOGIN_TOKEN` | off Spaces, whom the UI's sign-in mock signs in as | the bot's token (the demo user in the demo) |
| `MERGEBOT_WATCH_REPOS` | repos whose discussions are merge or search requests (`org/name`, `spaces/org/name`) | the Space itself (`SPACE_ID`) |
| `MERGEBOT_DISCUSSION_POLL_SECONDS`, `MERGEBOT_FOLLOW_CHECK_SECONDS` | how often the clock polls discussions and checks followed sources | 60, 3600 |
| `MERGEBOT_WEBHOOK_SECRET` | the secret Hub webhooks must carry to `/api/webhooks/hub` | none: the endpoint is off |
| `MERGEBOT_MAX_COMMENT_KB` | size of a discussion comment the bot reads for a request (a longer one gets a reply saying so) | 512 |
| `MERGEBOT_DISCUSSION_DAILY` | merge and search requests per discussion author per day | 5 |
| `MERGEBOT_ALLOW_NAMESPACES`, `MERGEBOT_DENY_NAMESPACES` | comma lists: namespaces a discussion request may (not) read from | any / none |
| `MERGEBOT_MAX_SEARCH_TRIALS`, `MERGEBOT_MAX_SEARCH_HOURS` | trials (all stages) and wall time of one evolutionary search; a spec without `wall_time` gets the latter | 300, 6 |
| `MERGEBOT_MAX_SEARCH_GENES`, `MERGEBOT_MAX_SEARCH_TASKS` | genes of one stage of a search (counted from the spec and the sources' headers) and fitness tasks of one search | 5000, 16 |
| `MERGEBOT_SEARCH_TRIALS_DAILY`, `MERGEBOT_SEARCH_HOURS_DAILY` | trials and wall time of all searches one requester asks for in 24 hours (an ended search counts the time it searched), checked when the search is queued | 1000, 24 |
| `MERGEBOT_SEARCH_SLICE_MINUTES` | how long a search keeps a worker's search lane while another search waits; then it goes to the back of the queue after its current trial | 10 |
| `MERGEBOT_MAX_QUEUED_ANONYMOUS` | queued jobs of all requests without sign-in together | 1 |
| `MERGEBOT_MAX_BODY_KB` | size of one HTTP request body (413 above it) | 1024 |
| `MERGEBOT_MAX_RECIPE_KB`, `MERGEBOT_MAX_RECIPE_DEPTH`, `MERGEBOT_MAX_RECIPE_NODES` | a recipe's size, nesting, and values once YAML aliases are expanded | 256, 32, 50000 |
| `MERGEBOT_MAX_EXAMPLES`, `MERGEBOT_MAX_EXAMPLE_CHARS` | inline calibration examples per block, and characters per example | 1024, 8192 |
| `MERGEBOT_MAX_NAME_CHARS` | characters of any name or string in a recipe | 256 |
| `MERGEBOT_MAX_PATTERNS`, `MERGEBOT_MAX_PATTERN_CHARS` | patterns in a recipe's `discard:` list, and characters per pattern (checked before any is compiled; patterns run on RE2, in linear time) | 64, 512 |
| `MERGEBOT_IDENTITY_TTL_SECONDS` | how long the Hub's answer to "whose token is this" is reused | 300 |
| `MERGEBOT_HUB_TIMEOUT_SECONDS` | how long a request waits for the Hub to check a token (503 after) | 10 |
| `MERGEBOT_HUB_PATIENCE_SECONDS` | how long a job's Hub step retries through an outage before the job fails | 600 |
| `MERGEBOT_OUTAGE_CHECK_SECONDS` | how often the clock looks whether the Hub is back, to run jobs an outage failed once more | 60 |
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from merge_engine.errors import MergeError, excerpt
from merge_engine.recipe.limits import DEFAULT_LIMITS, RecipeLimits


@dataclass(frozen=True)
class Limits:
    max_models: int = 8
    max_source_bytes: int = 100 * 10**9


@dataclass(frozen=True)
class SearchLimits:
    """How much searching one request, and one requester in a day, may ask for."""

    max_trials: int = 300
    """Trials of one search, all stages together."""
    max_hours: float = 6.0
    """Wall time of one search; also the wall time of a spec that gives none."""
    daily_trials: int = 1000
    daily_hours: float = 24.0
    max_genes: int = 5000
    """Genes of one stage: the paper's data-flow space over two 32-layer models, 3 repeats, has
    4,288. The optimizer costs about 0.1 s a trial at 5,000 genes, and the study database
    about 22 bytes per trial and gene (33 MB for 300 trials at 5,000 genes)."""
    max_tasks: int = 16
    """Fitness tasks of one search: every trial scores every task."""


@dataclass(frozen=True)
class SearchUse:
    """What a requester's searches of the last 24 hours count against the daily limits: the
    trials they booked, and their wall time (all of it while a search waits or runs; what it
    used once it ended)."""

    trials: int
    seconds: float


PUBLIC_HUB = "https://huggingface.co"


@dataclass(frozen=True)
class Settings:
    work_dir: Path
    database_url: str
    endpoint: str = PUBLIC_HUB
    bot_token: str | None = field(default=None, repr=False)
    bot_namespace: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    worker_id: str | None = None
    """Set by the command when not given: ``<host>-serve`` or ``<host>-worker0``."""
    device: str = "auto"
    limits: Limits = Limits()
    search_limits: SearchLimits = SearchLimits()
    max_queued_per_requester: int = 3
    watch_repos: tuple[str, ...] = ()
    """``type/namespace/name`` of each repo whose discussions are merge requests."""
    discussion_poll_seconds: float = 60.0
    follow_check_seconds: float = 3600.0
    webhook_secret: str | None = field(default=None, repr=False)
    discussion_daily: int = 5
    max_comment_bytes: int = 512 * 1024
    """A discussion comment longer than this is not read (a recipe is at most 256 KiB)."""
    allow_namespaces: tuple[str, ...] = ()
    deny_namespaces: tuple[str, ...] = ()
    local_login_token: str | None = field(default=None, repr=False)
    """Off Spaces, whom Gradio's sign-in mock signs in as (see ``service.server``)."""
    disk_margin_bytes: int = 5 * 10**9
    """Free disk kept beside every job's sources and output (see ``service.disk``)."""
    search_slice_seconds: float = 600.0
    """A search's turn in a worker's search lane while another search waits (see
    ``docs/architecture.md``, "Scheduling")."""
    max_queued_anonymous: int = 1
    """Requests without sign-in share one, smaller, queue quota."""
    max_body_bytes: int = 1024 * 1024
    recipe_limits: RecipeLimits = DEFAULT_LIMITS
    """Checked on every recipe's text before anything else is done with it."""
    identity_ttl_seconds: float = 300.0
    hub_timeout_seconds: float = 10.0
    hub_patience_seconds: float = 600.0
    outage_check_seconds: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        work_dir = Path(env.get("MERGEBOT_WORK_DIR", "mergebot-data")).resolve()
        return cls(
            work_dir=work_dir,
            database_url=env.get("MERGEBOT_DATABASE_URL")
            or f"sqlite:///{work_dir / 'mergebot.sqlite'}",
            endpoint=env.get("HF_ENDPOINT", PUBLIC_HUB).rstrip("/"),
            bot_token=env.get("HF_TOKEN") or None,
            bot_namespace=env.get("MERGEBOT_NAMESPACE") or None,
            secret_key=env.get("MERGEBOT_SECRET_KEY") or None,
            worker_id=env.get("MERGEBOT_WORKER_ID") or None,
            device=env.get("MERGEBOT_DEVICE", "auto"),
            limits=Limits(
                max_models=int(_number(env, "MERGEBOT_MAX_MODELS", Limits.max_models)),
                max_source_bytes=int(
                    _number(env, "MERGEBOT_MAX_SOURCE_GB", Limits.max_source_bytes / 1e9) * 1e9
                ),
            ),
            search_limits=SearchLimits(
                max_trials=int(_number(env, "MERGEBOT_MAX_SEARCH_TRIALS", SearchLimits.max_trials)),
                max_hours=_number(env, "MERGEBOT_MAX_SEARCH_HOURS", SearchLimits.max_hours),
                daily_trials=int(
                    _number(env, "MERGEBOT_SEARCH_TRIALS_DAILY", SearchLimits.daily_trials)
                ),
                daily_hours=_number(env, "MERGEBOT_SEARCH_HOURS_DAILY", SearchLimits.daily_hours),
                max_genes=int(_number(env, "MERGEBOT_MAX_SEARCH_GENES", SearchLimits.max_genes)),
                max_tasks=int(_number(env, "MERGEBOT_MAX_SEARCH_TASKS", SearchLimits.max_tasks)),
            ),
            max_queued_per_requester=int(_number(env, "MERGEBOT_MAX_QUEUED", 3)),
            max_queued_anonymous=int(_number(env, "MERGEBOT_MAX_QUEUED_ANONYMOUS", 1)),
            search_slice_seconds=_number(env, "MERGEBOT_SEARCH_SLICE_MINUTES", 10) * 60,
            disk_margin_bytes=int(_number(env, "MERGEBOT_DISK_MARGIN_GB", 5) * 1e9),
            max_body_bytes=int(_number(env, "MERGEBOT_MAX_BODY_KB", 1024) * 1024),
            recipe_limits=_recipe_limits(env),
            identity_ttl_seconds=_number(env, "MERGEBOT_IDENTITY_TTL_SECONDS", 300),
            hub_timeout_seconds=_number(env, "MERGEBOT_HUB_TIMEOUT_SECONDS", 10),
            hub_patience_seconds=_number(env, "MERGEBOT_HUB_PATIENCE_SECONDS", 600),
            outage_check_seconds=_number(env, "MERGEBOT_OUTAGE_CHECK_SECONDS", 60),
            local_login_token=env.get("MERGEBOT_LOCAL_LOGIN_TOKEN") or None,
            watch_repos=tuple(
                _repo_key(name)
                for name in _names(env.get("MERGEBOT_WATCH_REPOS"))
                or ([f"spaces/{env['SPACE_ID']}"] if env.get("SPACE_ID") else [])
            ),
            discussion_poll_seconds=_number(env, "MERGEBOT_DISCUSSION_POLL_SECONDS", 60),
            follow_check_seconds=_number(env, "MERGEBOT_FOLLOW_CHECK_SECONDS", 3600),
            webhook_secret=env.get("MERGEBOT_WEBHOOK_SECRET") or None,
            discussion_daily=int(_number(env, "MERGEBOT_DISCUSSION_DAILY", 5)),
            max_comment_bytes=int(_number(env, "MERGEBOT_MAX_COMMENT_KB", 512) * 1024),
            allow_namespaces=tuple(_names(env.get("MERGEBOT_ALLOW_NAMESPACES"))),
            deny_namespaces=tuple(_names(env.get("MERGEBOT_DENY_NAMESPACES"))),
        )

    @property
    def uses_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def for_role(self, role: str) -> Settings:
        """These settings with the worker id defaulted for ``serve`` or ``worker``."""
        suffix = {"serve": "serve", "tick": "tick"}.get(role, "worker0")
        return replace(self, worker_id=self.worker_id or f"{socket.gethostname()}-{suffix}")

    def job_dir(self, job_id: str) -> Path:
        return self.work_dir / "jobs" / job_id


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    """A numeric setting; a value that is not a number is one sentence naming the variable."""
    text = env.get(name)
    if text is None:
        return default
    try:
        return float(text)
    except ValueError:
        raise MergeError(
            f"{name}={excerpt(text)} is not a number; set it to a number or unset it for the default ({default:g})"
        ) from None


def _recipe_limits(env: Mapping[str, str]) -> RecipeLimits:
    default = DEFAULT_LIMITS
    return RecipeLimits(
        max_bytes=int(_number(env, "MERGEBOT_MAX_RECIPE_KB", default.max_bytes / 1024) * 1024),
        max_depth=int(_number(env, "MERGEBOT_MAX_RECIPE_DEPTH", default.max_depth)),
        max_nodes=int(_number(env, "MERGEBOT_MAX_RECIPE_NODES", default.max_nodes)),
        max_examples=int(_number(env, "MERGEBOT_MAX_EXAMPLES", default.max_examples)),
        max_example_chars=int(
            _number(env, "MERGEBOT_MAX_EXAMPLE_CHARS", default.max_example_chars)
        ),
        max_name_chars=int(_number(env, "MERGEBOT_MAX_NAME_CHARS", default.max_name_chars)),
        max_patterns=int(_number(env, "MERGEBOT_MAX_PATTERNS", default.max_patterns)),
        max_pattern_chars=int(
            _number(env, "MERGEBOT_MAX_PATTERN_CHARS", default.max_pattern_chars)
        ),
    )


def _names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def _repo_key(name: str) -> str:
    """``org/name`` → ``model/org/name``; ``spaces/org/name`` → ``space/org/name``."""
    kind, _, rest = name.partition("/")
    plural = {"spaces": "space", "datasets": "dataset", "models": "model"}
    return f"{plural[kind]}/{rest}" if kind in plural and rest.count("/") == 1 else f"model/{name}"
