"""Monitoring: JSON API and (later) the web UI."""
