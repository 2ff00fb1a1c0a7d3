"""The compiled Program and what runs it: numerical health, CUDA graphs, several processes, checkpoints."""
