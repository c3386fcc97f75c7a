"""Reliability suite: hostile input, vanishing clients, slow readers, load, leaks and deadlines."""
