"""Generation: a tuned model ready to decode (merged in memory when exact), prompt files,
and the sampling settings `generate`, `chat` and `eval --generate` share."""
