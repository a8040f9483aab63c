"""`python -m tnlora_cli ...` (what `accelerate launch -m tnlora_cli train ...` runs)."""

from .cli import main

main()
