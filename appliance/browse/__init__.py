"""Browsing a snapshot or a backup as files: an image served read-only over FUSE, with its
file system mounted read-only from it (docs/browse.md)."""
