"""Training loops, command-line flags, metrics and data sets."""
