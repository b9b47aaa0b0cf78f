"""steerlib version, importable by any layer without importing the package face."""

__version__ = "0.1.0"
