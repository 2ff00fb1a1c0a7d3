"""The equations of a step: output and inner errors, error synapses, the reference interpreter."""
