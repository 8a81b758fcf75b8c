"""Helpers shared by Waddle's test suites (databases, processes, ...)."""
