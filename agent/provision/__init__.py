"""Technician provisioning of boards over USB serial (pulsebridge provision)."""
