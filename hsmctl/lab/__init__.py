"""The namespace lab: appliances, tenant networks and the provider network on one host."""
