"""The stages of the pipeline: pure decisions over records, I/O kept at their edges."""
