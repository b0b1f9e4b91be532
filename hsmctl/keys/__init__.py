"""The customer's keys on an appliance (SPEC §11 ``hsmctl key list|generate|destroy``),
through the same remote PKCS#11 path as an application: the kit's ``remote:`` command
(OpenSSH to ``p11-NAME`` on the data interface, ``p11-kit remote`` behind the device's
key policy) served to p11-kit's client module, used with python-pkcs11. No side door.

:mod:`spec` is pure (the ``--type`` grammar, a key's row, what a refusal means);
:mod:`remote` is the PKCS#11 boundary (its errors are translated there only);
:mod:`workflow` picks the kit and the PIN and runs the three commands.
"""
