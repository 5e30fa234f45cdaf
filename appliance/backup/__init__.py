"""Backups of volumes to NFS or S3 targets: the store format (docs/backup-format.md), block
objects, targets, and the backup and restore workers."""
