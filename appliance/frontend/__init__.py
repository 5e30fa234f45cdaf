"""Frontends: how a volume reaches its users (local block device, iSCSI, NFS)."""
