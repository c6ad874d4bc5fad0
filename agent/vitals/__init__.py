"""Derived vital signs, computed on the hub as frames stream in."""
