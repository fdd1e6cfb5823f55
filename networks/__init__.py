"""LoRA networks (``--network_module networks.lora_kandinsky``)."""
