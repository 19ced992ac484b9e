"""Benchmarks and diagnostics: they import the library (pipelines, models, explainer), never the reverse."""
