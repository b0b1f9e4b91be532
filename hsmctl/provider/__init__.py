"""The provider's side: drivers for where devices live, provisioning, deprovisioning,
health."""
