"""A replicated block-storage appliance for bare-metal Linux nodes."""

__version__ = "0.1.0"
