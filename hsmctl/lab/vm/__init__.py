"""The Vagrant tier: appliances as libvirt/QEMU VMs booted from a box built locally from
the same image script as the namespace lab (SPEC §14, docs/vagrant.md)."""
