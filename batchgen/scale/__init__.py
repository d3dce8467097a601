"""Backends beyond one process: Ray Data for clusters."""
