"""LoRA speaker adapters (peft) on quantised ESPnet models."""
from pqm_ext.lora.config import AdapterConfig
from pqm_ext.lora.batchnorm import freeze_batchnorm
from pqm_ext.lora.inject import adapter_num_params, add_adapter, target_layers
from pqm_ext.lora.io import adapter_config_of, load_adapter, load_initial_adapter, read_adapter, save_adapter

__all__ = ["AdapterConfig", "add_adapter", "adapter_num_params", "freeze_batchnorm", "target_layers",
           "save_adapter", "load_adapter", "load_initial_adapter", "read_adapter", "adapter_config_of"]
