"""mergebot's bot: intake, durable jobs, Hub I/O and the Space, built on :mod:`merge_engine`.

A request (``intake``) goes through the one submit path (``jobs``) into the job table
(``job_store``) and a durable workflow (``pipeline``, started by ``worker``) that merges, checks
(``verify``) and publishes (``hub``); ``api`` serves it as JSON and ``ui`` (with
``recipe_form``) as the Space, both started by ``server``; ``clock`` tidies up, and
``sandbox_hub`` stands in for the Hub in tests and in the offline demo.
"""
