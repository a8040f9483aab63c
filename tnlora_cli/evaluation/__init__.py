"""Evaluation: held-out metrics (loss, accuracy, macro-F1, perplexity), scoring of generated
text (exact match, answer accuracy, BLEU, chrF, ROUGE-L) and the lm-evaluation-harness bridge."""
