"""Bridges to other libraries: tnlora's adapters as peft methods (`peft.py`) and the peft
adapter directory format (`peft_format.py`), reusing the adapters and injection of the wings below."""
