"""GGUF export: a trained model as one file that llama.cpp (llama-cpp-python, llama-server, ollama) runs.

`export_gguf(spec, out, kind=...)` writes a checkpoint, a model folder or a LoRA adapter (merged into
its base first) in f32, f16 or q8_0 with `gguf.GGUFWriter`, carrying the tokenizer, the chat template
and the end-of-turn token, so llama.cpp tokenizes, formats chats and stops like the Hugging Face
model. `architectures.py` holds what differs per model family, `vocabulary.py` the tokenizer
metadata, `tensors.py` the storage types, `gguf_file.py` the writing.
"""

from instructune.model.export.gguf_file import GGUF_TYPES, check_output, end_of_turn_id, export_gguf

__all__ = ["GGUF_TYPES", "check_output", "end_of_turn_id", "export_gguf"]
