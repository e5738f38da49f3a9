"""Comparison reports built from the results store (tables, statistics, plots, HTML)."""
