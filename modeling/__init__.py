"""The model: CLIP tower + projector, Llama + LoRA + special tokens, SAM encoder and mask decoder, losses.

`from modeling import build_model` works; the heavy imports (torch, transformers, deepspeed) happen on
first use so that `modeling.config` stays cheap for the launcher's config validation.
"""

_LAZY = {
    "build_model": "modeling.build",
    "SegCapModel": "modeling.model",
    "ModelOutput": "modeling.model",
    "Prediction": "modeling.model",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'modeling' has no attribute {name!r}")
