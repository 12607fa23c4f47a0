"""Reformer."""
