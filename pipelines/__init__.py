"""Ray data pipelines for ColorFlow: ingestion, retrieval cache, screentone, shards.

Importing this package stays cheap: Ray is imported only by the modules that distribute work.
"""
