"""Scoring colourisations against a benchmark (`jobs.evaluate`): metrics, scoring, reports."""
