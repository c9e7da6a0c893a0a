"""Fault suites: the daemon against a misbehaving network in front of the real cloud."""
