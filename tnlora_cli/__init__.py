"""tnlora: fine-tune Hugging Face models with tensor-network adapters.

The library is importable on its own; `tnlora_cli.cli` is a thin Typer layer over it.
"""

__version__ = "0.1.0"
