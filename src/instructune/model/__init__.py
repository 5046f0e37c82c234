"""Loading models (Hub id, folder, GGUF), LoRA, and the lean layer and attention kernels."""
