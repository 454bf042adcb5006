"""fogline: an edge computing stack for Python."""

__version__ = "0.1.0"
