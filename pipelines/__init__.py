"""Ray data pipelines for ColorFlow, one sub-package per layer or stage.

``core`` holds the pure, Ray-free helpers and on-disk formats every stage shares; ``runtime`` starts Ray,
distributes units and checks preconditions; ``ingest``, ``retrieval``, ``screentone`` and ``shards`` are the
stages, each driven by its ``stage`` module; ``runner`` runs them in order. Importing this package stays cheap:
Ray is imported only by the modules that distribute work.
"""
