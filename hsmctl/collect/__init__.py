"""Activity-log collection on the customer's side (SPEC §8): pull each appliance's log as
``audit``, verify it as it streams in, archive it, re-verify and export it.

``archive`` is the per-appliance store (segments, cursor, lock); ``pipeline`` verifies a
stream in chunks, on several cores for large logs; ``collector`` runs collections over
many appliances and re-verifies whole archives offline; ``export`` turns the archive
into JSON lines or RFC 5424 syslog.
"""
