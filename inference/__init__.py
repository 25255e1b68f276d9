"""Colouring pages (`jobs.colorize`): sources, references, models, the plan of a run, the worker, sheets."""
