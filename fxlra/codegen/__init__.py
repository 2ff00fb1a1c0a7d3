"""From a Plan to the generated update program: statements, streams, critical paths."""
