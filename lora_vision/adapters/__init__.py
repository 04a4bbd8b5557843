"""Adapter files: save, read and load adapters in lora_vision's format and in Hugging Face PEFT's.

Imports run one way: `errors` and `tensors` import no other module here; `fingerprint` and `record` build on them,
`native` on those, `peft` on `native`, and `load` on `native` and `peft`.

`tensors`: which state-dict tensors an adapter holds; `fingerprint`: weights and structure fingerprints and the
check that a base is the recorded one; `record`: the JSON records and the method record in them, read as data;
`native`: our format (`adapter.safetensors` + `adapter.json`); `peft`: PEFT's format both ways; `load`: one
`load_adapter` / `load_adapted_model` for either format, `load_adapters` for several on one model (and
`load_adapters_onto_recorded_base`, on the base the first one records). Loading an adapter runs no code named by
its files.
"""

from lora_vision.adapters.errors import AdapterFormatError, AdapterMismatchError, BaseWeightsMismatchError
from lora_vision.adapters.fingerprint import (
    architecture,
    check_base,
    head_classes,
    structure_fingerprint,
    weights_fingerprint,
)
from lora_vision.adapters.load import load_adapted_model, load_adapter, load_adapters, load_adapters_onto_recorded_base
from lora_vision.adapters.native import (
    ADAPTER_DIR,
    ADAPTER_META,
    ADAPTER_TENSORS,
    FORMAT,
    FORMAT_VERSION,
    adapter_directory,
    build_recorded_base,
    check_base_source,
    read_adapter_meta,
    read_adapter_record,
    save_adapter,
)
from lora_vision.adapters.peft import (
    PEFT_CONFIG,
    PEFT_TENSORS,
    PEFT_VERSIONS,
    SIDE_META,
    is_peft_adapter,
    load_peft_adapted_model,
    load_peft_adapter,
    peft_adapter,
    peft_meta,
    peft_record,
    save_peft_adapter,
)
from lora_vision.adapters.record import read_meta
from lora_vision.adapters.tensors import adapter_keys, adapter_state
from lora_vision.lora.errors import PeftFormatError

__all__ = [
    "ADAPTER_DIR",
    "ADAPTER_META",
    "ADAPTER_TENSORS",
    "FORMAT",
    "FORMAT_VERSION",
    "PEFT_CONFIG",
    "PEFT_TENSORS",
    "PEFT_VERSIONS",
    "SIDE_META",
    "AdapterFormatError",
    "AdapterMismatchError",
    "BaseWeightsMismatchError",
    "PeftFormatError",
    "adapter_directory",
    "adapter_keys",
    "adapter_state",
    "architecture",
    "build_recorded_base",
    "check_base",
    "check_base_source",
    "head_classes",
    "is_peft_adapter",
    "load_adapted_model",
    "load_adapter",
    "load_adapters",
    "load_adapters_onto_recorded_base",
    "load_peft_adapted_model",
    "load_peft_adapter",
    "peft_adapter",
    "peft_meta",
    "peft_record",
    "read_adapter_meta",
    "read_adapter_record",
    "read_meta",
    "save_adapter",
    "save_peft_adapter",
    "structure_fingerprint",
    "weights_fingerprint",
]
