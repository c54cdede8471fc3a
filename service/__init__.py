"""mergebot's bot: intake, durable jobs, Hub I/O and the Space, built on :mod:`merge_engine`.

One folder per part, imports running one way: the Space (``space``) and the JSON API (``api``)
hand requests to the intake (``intake``: every origin's request into one submit path), which
queues the durable workflows (``workflows``: a merge's and a search's steps, the job table,
the worker); they publish through the Hub client (``hub_client``) and check results with
``verification``. ``server`` runs them in one process, ``cli`` is the ``mergebot`` command and
``demo`` the offline demo's Hub. ``sandbox_hub`` is a Hub, not part of the bot: it stands in for
the Hub in the tests and the demo, and the bot reaches it only through ``HF_ENDPOINT``. See
docs/architecture.md.
"""
