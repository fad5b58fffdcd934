"""Attestation: evidence verification per mode and policy evaluation (pure, no I/O)."""
