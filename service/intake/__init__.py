"""Intake: every origin's request, checked, into one submit path. A request (``request``: a
merge or a search, Hub-only references, Hub-valid names, push rights, size and search-budget
limits, the job id) and who asks (``identities``) go through
:class:`~service.intake.jobs.JobService` (``jobs``: submit, cancel, following, status reads
cached per moment in ``recent_jobs``, runs again after an outage), which queues the job's
workflow. The origins that are not a person at the Space or the API live here too, because each
of them only turns something into a request: a discussion's ``yaml`` block (``discussions``), a
followed source that moved (``follows``), and the clock that polls both and tidies up
(``clock``). Imported by the Space and the API; imports the workflows, the Hub client and the
engine, never the other way.
"""
