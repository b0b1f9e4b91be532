"""Application clients of an appliance (SPEC §11): register, list, revoke, and the kit an
application's host uses as is. :mod:`kit` builds the kit's files (pure);
:mod:`workflow` talks to the device as ``admin`` over the one SSH transport."""
