"""hsmctl: orchestrator for a dedicated-HSM service.

This module stays import-light: the appliance firmware imports ``hsmctl.appliance``
and ``hsmctl.auditlog`` with only Debian's python3 and its packages on the device.
"""

__version__ = "0.1.0"
