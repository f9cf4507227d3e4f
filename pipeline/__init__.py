"""The pipeline: a Trio structured-concurrency message path for a WhatsApp AI assistant."""

__version__ = "0.1.0"
