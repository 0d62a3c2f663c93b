"""jmoe's Flax NNX modules, one concept per file; the public names are `jmoe.nn`."""
