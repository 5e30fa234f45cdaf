"""The CSI plugin: Identity, Controller and Node services over the node daemon's API."""
