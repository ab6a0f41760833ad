"""analyses: one module per analysis of the papers headlab reproduces, plus task generators.

An analysis takes a loaded model (:class:`probe.LoadedModel`) and a typed config, uses probe, and
returns tidy pandas tables and figures. It never writes files itself: the run store does.
"""
