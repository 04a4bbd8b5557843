"""lora_vision: low-rank adaptation studies on timm vision backbones."""

__version__ = "0.1.0"
