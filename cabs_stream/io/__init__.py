"""Reading inputs (safetensors headers, checkpoints, .bin conversion, memory maps) and
writing the output folder."""
