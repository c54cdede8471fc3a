"""The durable workflows (DBOS) and the job table they run from. The workflow of a job and its
queues (``job_workflow``), a merge's steps (``merge_steps``: pre-flight → download → merge →
verify → card → push) and a search's (``search_steps``), what every step needs (``steps``: the
running service, the job, its token, Hub calls that ride out an outage, cancel), the jobs table
and its limits (``job_store``), requesters' tokens while a job needs them (``token_vault``),
events claimed once (``once``), the requester told in their discussion when a job ends
(``replies``) and the worker that starts DBOS (``worker``). The intake queues a workflow by
importing this part; nothing here imports the intake: the worker hands the steps the process's
job service (``steps.configure``), typed by what they use of it.
"""
