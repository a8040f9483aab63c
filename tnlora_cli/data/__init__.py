"""Data: sources (files, folders, globs, hub ids, embedded sets), tokenization per task,
chat rendering and loss masks, the on-disk cache and the memory-mapped examples training reads."""
