"""Renderers: pure functions of records (rich tables, JSON, matplotlib figures)."""
