"""mergebot's bot: intake, durable jobs, Hub I/O and the Space, built on :mod:`merge_engine`.

Empty until the service issue lands; the package exists so the distribution's layout is final.
"""
