"""The device's commands by family, each a handler ``(daemon, ctx, cmd, secrets) -> Reply``
that runs once the daemon has parsed, authorised and logged the command; the table that
names them is ``appliance/handlers.py``.

``common`` (the ``Reply``, the caller's ``Context``), ``hsm`` (the customer's token),
``clients`` (application clients, SPEC §11), ``users`` (accounts and ownership),
``sysconf`` (provider access, host keys, factory reset), ``network``, ``audit`` (the
activity log and its key).
"""
