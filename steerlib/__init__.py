"""steerlib: extract, steer, monitor and flag character traits in language models."""

__version__ = "0.1.0"
