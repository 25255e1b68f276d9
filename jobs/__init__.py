"""Command-line entry points: each job parses its arguments and calls one pipeline function."""
