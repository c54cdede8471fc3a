"""The Space: the Gradio Blocks people use in the browser, and nothing else of the bot. The
merge form and the search form as data, both ways to YAML (``recipe_form``, ``search_form``),
the New merge and Jobs tabs (``ui``), the Search tab with its live plot (``search_tab``) and how
a job is shown in either (``job_panel``). A tab validates and submits through the intake's
:class:`~service.intake.jobs.JobService`, the same path as every other origin; it imports the
intake and the engine, and nothing imports it but the process that serves it (``server``).
"""
