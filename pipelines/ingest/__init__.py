"""Stage 1, ingestion: read a dump of chapters, classify colour pages, keep chapters with enough of them and
store their pages. `stage` drives it."""
