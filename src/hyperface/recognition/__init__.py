"""recognition stage."""
