"""mergebot's bot: intake, durable jobs, Hub I/O and the Space, built on :mod:`merge_engine`.

A request (``intake``) goes through the one submit path (``jobs``) into the job table
(``job_store``) and a durable workflow (``pipeline``, started by ``worker``) that merges, checks
(``verify``) and publishes (``hub``); an evolutionary search runs ``search_steps`` instead, its
trials shared by every idle worker. ``api`` serves it as JSON and ``ui`` as the Space (with
``recipe_form``, ``search_form``, ``search_tab`` and ``job_panel``), both started by
``server``; ``clock`` tidies up, and ``sandbox_hub`` stands in for the Hub in tests and in the
offline demo.
"""
