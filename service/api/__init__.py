"""The JSON API beside the Space: the FastAPI app (``app``: bounded bodies, ``{error, field}``
refusals, status reads served once per job per moment, the discussion webhook) and its
reference page, readable offline (``reference``). Like the Space it hands every request to the
intake's one submit path and imports nothing above the intake; ``server`` mounts it.
"""
