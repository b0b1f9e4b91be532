"""The customer's side, run from inside the tenant network: takeover, release, and the
state (secret store, pins, journals, log archives) kept in the customer's state
directory."""
