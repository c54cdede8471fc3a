"""mergebot's bot: intake, durable jobs, Hub I/O and the Space, built on :mod:`merge_engine`.

So far: ``sandbox_hub`` (a Hub-compatible server for tests and the offline demo), ``intake``
(the service's checks on a request and its job id), ``hub`` (publishing a merge as one commit
per job), ``retry`` (which Hub failures to retry) and ``cli`` (the ``mergebot`` command).
"""
