"""The provider's inventory: the fleet (regions, stamps, appliances) and the tenants'
networks, read from YAML and validated strictly before anything acts on it."""

from hsmctl.inventory.load import check_placement, inventory_files, load_inventory, parse_inventory
from hsmctl.inventory.model import (
    Appliance,
    Declared,
    Inventory,
    InventoryError,
    Placement,
    PlacementError,
    PublicKey,
    Quota,
    Region,
    Stamp,
    Subnet,
    Tenant,
    Vnet,
    is_reserved,
    usable_addresses,
)

__all__ = [
    "Appliance",
    "Declared",
    "Inventory",
    "InventoryError",
    "Placement",
    "PlacementError",
    "PublicKey",
    "Quota",
    "Region",
    "Stamp",
    "Subnet",
    "Tenant",
    "Vnet",
    "check_placement",
    "inventory_files",
    "is_reserved",
    "load_inventory",
    "parse_inventory",
    "usable_addresses",
]
