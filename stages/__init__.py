"""The work: one module per stage, each with a frozen ``Config``, a ``Result`` and ``run()``.

Stages never import each other nor MLflow: they read and write named files in the run directory
(``pipeline.rundir``) and report through a small ``Tracker`` handed to them.
"""
