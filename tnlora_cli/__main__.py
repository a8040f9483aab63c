"""`python -m tnlora_cli ...` (what `accelerate launch -m tnlora_cli train ...` runs)."""

from __future__ import annotations

from .cli import main

main()
