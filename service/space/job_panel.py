"""How a job is shown in the Space, whichever tab follows it: the sentence under the buttons,
the stage bars, the summary and the card, who may see it, and cancelling or stopping it."""

from __future__ import annotations

import html
import re
from typing import Any

import gradio as gr
import yaml

from merge_engine.errors import MergeError
from merge_engine.recipe import quote
from merge_engine.recipe.hub_names import is_loopback
from service.intake.jobs import JobService
from service.intake.request import Identity
from service.space.search_form import fitness_table
from service.workflows.job_store import ACTIVE, Job

POLL_SECONDS = 1.0


def identity_of(service: JobService, token: gr.OAuthToken | None) -> Identity:
    return service.identities.of(token.token if token else None)


def job_sentence(job: Job) -> str:
    """The line under the buttons about ``job``, kept up to date by the poll."""
    verb = {
        "queued": "is queued",
        "running": "is running",
        "succeeded": "succeeded",
        "failed": "failed",
        "cancelled": "was cancelled",
    }.get(job.status, f"is {job.status}")
    if job.finish_early and job.status == "running":
        verb = "is stopping to publish the best so far"
    return f"Job {job.id} {verb}."


STAGE_DONE = re.compile(r"^(?P<stage>[\w-]+): done in (?P<seconds>[\d.]+) s$")


BAR_CSS = (
    "<style>.job-bars .bar{display:flex;gap:.6em;align-items:center;margin:.15em 0}"
    ".job-bars .bar span:first-child{width:7em}.job-bars progress{flex:1;height:.9em}"
    ".job-bars .bar span:last-child{width:3.5em;text-align:right}"
    ".job-bars .overall{font-weight:bold}</style>"
)


def stage_bar(label: str, fraction: float, kind: str = "stage") -> str:
    name = html.escape(label)
    return (
        f'<div class="bar {kind}" data-stage="{name}"><span>{name}</span>'
        f'<progress value="{fraction:.3f}" max="1" aria-label="{name}"></progress>'
        f"<span>{fraction:.0%}</span></div>"
    )


def stage_times(job: Job) -> dict[str, float]:
    """Seconds each finished stage took, from the job's log lines ``merge: done in 1.2 s``."""
    times = {}
    for line in job.log:
        found = STAGE_DONE.match(line)
        if found and found["stage"] in job.stages:
            times[found["stage"]] = float(found["seconds"])
    return times


def stage_fractions(job: Job) -> list[tuple[str, float]]:
    times = stage_times(job)
    current = job.stages.index(job.stage) if job.stage in job.stages else -1
    fractions = []
    for index, stage in enumerate(job.stages):
        if job.status == "succeeded" or stage in times or index < current:
            fractions.append((stage, 1.0))
        elif index == current:
            fractions.append((stage, min(max(job.fraction, 0.0), 1.0)))
        else:
            fractions.append((stage, 0.0))
    return fractions


def readable_bytes(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e3:.1f} kB"


def job_summary(job: Job) -> str:
    """What a finished job made: method, the pinned sources, its size, the time of each
    stage."""
    try:
        recipe = yaml.safe_load(job.recipe) or {}
    except yaml.YAMLError:
        recipe = {}
    method = recipe.get("merge_method", "?") if isinstance(recipe, dict) else "?"
    sources = ", ".join(f"{repo}@{commit[:8]}" for repo, commit in job.sources.items())
    times = stage_times(job)
    timing = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in times.items())
    items = [
        f"<li>method: <b>{html.escape(str(method))}</b></li>",
        f"<li>sources pinned: {html.escape(sources or 'none')}</li>",
    ]
    if job.output_bytes:
        items.append(f"<li>size: {readable_bytes(job.output_bytes)} of weights</li>")
    if times:
        total = sum(times.values())
        items.append(f"<li>time: {html.escape(timing)} (total {total:.1f} s)</li>")
    return f'<ul class="summary">{"".join(items)}</ul>'


def job_status_html(job: Job) -> str:
    head = (
        f"<p><b>{html.escape(job.status)}</b> · stage <b>{html.escape(job.stage)}</b> · "
        f"{job.progress:.0%}</p>"
    )
    bars = stage_bar("overall", job.progress, "overall") + "".join(
        stage_bar(stage, fraction) for stage, fraction in stage_fractions(job)
    )
    error = f'<p class="error">{html.escape(job.error)}</p>' if job.error else ""
    summary = ""
    if job.kind == "search" and job.outcome:
        summary = fitness_table(job.outcome)  # also of a search stopped after its search stage
    elif job.status == "succeeded":
        summary = job_summary(job)
    return f'{BAR_CSS}<div class="job-bars">{head}{bars}{error}{summary}</div>'


def job_panel(job: Job | None, endpoint: str) -> tuple[str, str, str, str]:
    """The status, log, link and card of ``job`` (empty without one), its Hub at ``endpoint``."""
    if job is None:
        return "", "", "", ""
    return job_status_html(job), "\n".join(job.log), result_link(job, endpoint), card_shown(job)


def result_link(job: Job, endpoint: str) -> str:
    """The link to the repo ``job`` published, once it has: on the demo's sandbox hub (the Hub
    at ``endpoint`` runs on this machine) it says so, since no other machine can open it."""
    if not job.url:
        return ""
    link = f"[{job.target}]({job.url})"
    if is_loopback(endpoint):
        return (
            f"{link}, on the local demo hub at `{endpoint}`: only a browser on the machine "
            "that runs this Space can open it"
        )
    return link


def polls_while(job: Job | None) -> gr.Timer:
    """The panel's timer, ticking only while ``job`` can still change: a finished job's
    panel is left alone (no read of the job table, no progress overlay over it each second)
    until another job is opened."""
    return gr.Timer(active=job is not None and job.status in ACTIVE)


def copy_stem(target: str) -> str:
    """The name a copy of a job into ``target`` proposes its own target after: the repo's name
    without a number a proposal added (``sd-blocks-2`` → ``sd-blocks``)."""
    return re.sub(r"-\d+$", "", target.rpartition("/")[2])


def copy_notice(job: Job) -> str:
    """What the merge form says when it holds a copy of ``job``'s recipe."""
    return (
        f"**A copy of job {job.id}** (into {job.target}), to run again with changes: edit what "
        "you like and press **Merge**; it goes to the new target below. The job's own progress, "
        "log and card are under the buttons."
    )


def own_jobs_hint(profile: gr.OAuthProfile | None, own: list[Job]) -> str:
    """What "Your jobs" says while it lists none."""
    if own:
        return ""
    if profile is None:
        return "Sign in with Hugging Face (the button at the top) to see your jobs here."
    return (
        "No jobs yet: load an example in **New merge** and press **Merge**, or start a search "
        "in **Search**; your jobs show here."
    )


def visible_job(service: JobService, job_id: str, profile: gr.OAuthProfile | None) -> Job | None:
    """The job ``job_id`` names, unless the signed-in person may not see it."""
    job = service.get(job_id.strip()) if job_id and job_id.strip() else None
    return job if job and may_see(job, profile) else None


def may_see(job: Job, profile: gr.OAuthProfile | None) -> bool:
    """A private job's card and log are its signed-in requester's only."""
    return not job.private or (profile is not None and job.requester == profile.username)


def updated_sentence(job: Job | None, said: str) -> Any:
    """The line under the buttons, following ``job`` once it speaks of it."""
    if job and re.match(rf"Job {re.escape(job.id)}\b", said or "") and said != job_sentence(job):
        return job_sentence(job)
    return gr.skip()


def stop_job(
    service: JobService, job_id: str, token: gr.OAuthToken | None, publish_best: bool = False
) -> str:
    """Cancel a job, or stop a search and publish its best so far; what happened, in a line."""
    try:
        job = service.cancel(job_id.strip(), identity_of(service, token), publish_best)
    except MergeError as error:
        return f"⚠ {quote.text(str(error))}"
    finally:
        service.searches.forget(job_id.strip())
    if job.finish_early and job.status == "running":
        return job_sentence(job)
    return f"Job {job.id}: {'cancel requested' if job.status in ACTIVE else job.status}."


def greeting_for(bot_namespace: str | None, profile: gr.OAuthProfile | None) -> tuple[str, str]:
    """Who the page speaks to, and the namespace their results go to ("" when none)."""
    if profile:
        said = (
            f"Signed in as **{profile.username}**: results go to your namespace, with your token."
        )
        return said, profile.username
    if bot_namespace:
        said = f"Not signed in: results go to **{bot_namespace}/…**, one job at a time for everyone not signed in."
        return said, bot_namespace
    return "Sign in with Hugging Face to merge: this bot has no namespace of its own.", ""


def proposed_target(service: JobService, stem: str, profile: gr.OAuthProfile | None) -> str:
    """A target in the person's namespace (else the bot's) that no job and no repo has yet,
    named after ``stem``: what a fresh form or a loaded example proposes ("" without one)."""
    _, namespace = greeting_for(service.settings.bot_namespace, profile)
    return service.free_target(namespace, stem) if namespace else ""


def latest_job_id(service: JobService, profile: gr.OAuthProfile | None, kind: str) -> str:
    """The signed-in person's latest job of ``kind``, for a browser that followed none."""
    if not profile:
        return ""
    own = [job for job in service.list(requester=profile.username, limit=20) if job.kind == kind]
    return own[0].id if own else ""


def card_shown(job: Job) -> str:
    """The job's card as the page shows it: without its metadata block, and with its images
    (a search's fitness plot) read from the published repo, not from this page's address."""
    card = re.sub(r"\A---\n.*?\n---\n", "", job.card or "", flags=re.DOTALL)
    if not job.url:
        return card
    base = f"{job.url}/resolve/{job.commit or 'main'}/"
    # alt text and path stop at the next bracket or parenthesis, so that a card full of "![" or
    # "](" (a recipe's text is in it) is scanned in linear time, not from every "![" to its end
    return re.sub(r"!\[([^][]*)\]\((?![a-z]+:)([^()\s]+)\)", rf"![\1]({base}\2)", card)


def remember(current: str) -> Any:
    """The job id to keep in the browser, when there is one."""
    return current.strip() if current and current.strip() else gr.skip()
