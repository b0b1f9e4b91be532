"""The device side of hsmctl (appliance firmware); runs on the appliance with Debian python3."""
