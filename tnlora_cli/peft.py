"""`import tnlora_cli.peft`: tnlora's tensor-network adapters become peft methods.

    import tnlora_cli.peft
    from tnlora_cli.peft import TeraConfig
    from peft import get_peft_model

    model = get_peft_model(model, TeraConfig(target_modules=["q_proj", "v_proj"], outdim=8))

The configs' fields are a recipe's `adapter:` keys. The bridge lives in
`tnlora_cli.integrations.peft`; a peft outside the tested range is refused at import.
"""

from __future__ import annotations

from .integrations.peft import (
    PEFT_TESTED,
    LorettaConfig,
    TensorGuideConfig,
    TeraConfig,
    TnloraMethod,
    TnloraModel,
    TnloraPeftConfig,
    TracConfig,
)

__all__ = [
    "PEFT_TESTED", "LorettaConfig", "TensorGuideConfig", "TeraConfig", "TnloraMethod", "TnloraModel", "TnloraPeftConfig", "TracConfig",
]
