"""Run directories: atomic writes (the one way tnlora writes), the layout of a run and its
checkpoints, adapter and training-state files, the run lock, resuming, and output checks."""
