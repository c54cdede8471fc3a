"""Reading the recipe, the first stage of a merge: the YAML schema (mergekit's format, plus the
``calibration`` and ``align`` blocks) and everything checked while it is read, before any model
is looked at: how much YAML is read (``limits``), users' patterns (``patterns``), repo ids and
revisions (``hub_names``), parameter precedence and filters (``parameters``); and ``quote``, how
a request's text reaches Markdown. Nothing here imports another stage."""
