"""Widgets and caching for the pages: ``*_ui`` functions draw widgets and return plain values (configs)."""
