"""Attacks on the pool and the site, each against real processes (issue 12)."""
