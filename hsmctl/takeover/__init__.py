"""Ownership transfer (SPEC §7): the customer takes an appliance over, lockout-safe."""
