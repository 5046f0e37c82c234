"""Write a model (a checkpoint, a folder, or a base model plus LoRA adapter) as one GGUF file for llama.cpp."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from instructune.disk import disk_full_error, is_disk_full
from instructune.errors import UserError

GGUF_TYPES = ("f32", "f16", "q8_0")
"""The storage types an export offers (see `tensors.py`)."""


def check_output(out: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """The output path, after making sure writing it will not destroy anything the user did not give up."""
    path = Path(out).expanduser()
    if path.suffix.lower() != ".gguf":
        raise UserError(f"the GGUF output {out} should end in .gguf")
    if path.is_dir():
        raise UserError(f"the GGUF output {out} is a folder; name a file")
    if path.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    return path


def export_gguf(spec: str, out: str | os.PathLike[str], *, kind: str = "f16", overwrite: bool = False,
                model=None, tokenizer=None) -> Path:
    """Write the model `spec` (or the already loaded `model` and `tokenizer`) to `out` as a GGUF file.

    A LoRA adapter is merged into its base first. The file is written next to `out` under a temporary
    name and renamed into place, so an interrupted export leaves any earlier `out` as it was.
    """
    if kind not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type {kind!r}; choose one of {', '.join(GGUF_TYPES)}")
    path = check_output(out, overwrite=overwrite)
    if model is None or tokenizer is None:
        model, tokenizer = _load(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        _write(model, tokenizer, Path(tmp), kind, name=Path(str(spec)).name or "model")
        # mkstemp makes the file private (0600); the export is an ordinary file, as the checkpoints are.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(path, export_bytes(model, kind)) from None
        raise UserError(f"cannot write {out}: {error.strerror or error}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)  # a failed export leaves nothing, under its name or another
    return path


def export_bytes(model, kind: str) -> int:
    """About how big the GGUF file of `model` will be: its weights at `kind`'s bytes per weight (q8_0 keeps
    a 2-byte scale per block of 32), plus a few MB of vocabulary and metadata."""
    per_weight = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}[kind]
    weights = sum(p.numel() for p in model.state_dict().values())
    return int(weights * per_weight) + 5_000_000


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _load(spec: str):
    """The model in fp32 with any LoRA adapter merged in, and its tokenizer (with the chat template)."""
    import torch

    from instructune.model.load import load_model, load_tokenizer
    from instructune.model.lora import merge_lora

    tokenizer = load_tokenizer(spec)
    model = merge_lora(load_model(spec, device="cpu", dtype=torch.float32))
    return model, tokenizer


def _write(model, tokenizer, path: Path, kind: str, *, name: str) -> None:
    import gguf
    import torch

    from instructune.model.export.architectures import architecture_of
    from instructune.model.export.tensors import FILE_TYPES, encode
    from instructune.model.export.vocabulary import read_vocabulary

    model = getattr(model, "module", model)
    architecture = architecture_of(model)
    config = model.config
    vocabulary = read_vocabulary(tokenizer, config.vocab_size, end_of_turn_id(model, tokenizer))
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[architecture.arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    architecture.write_parameters(writer, config)
    vocabulary.write(writer)
    with torch.no_grad():
        for hf_name, weight in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp reads the output head from token_embd when `output` is absent
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"GGUF export does not know where the weight {hf_name} goes in llama.cpp's "
                                f"{gguf.MODEL_ARCH_NAMES[architecture.arch]} model")
            converted = architecture.convert(hf_name, weight.detach().float().cpu(), config)
            data, qtype = encode(converted.numpy(), kind)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def end_of_turn_id(model, tokenizer) -> int | None:
    """The token that ends an assistant turn: the stop token the checkpoint records beside EOS, else EOS.

    Checkpoints record the chat template's stop tokens in generation_config.json (`eos_token_id`, a list
    with EOS first); the chat template's end-of-turn marker is the fallback.
    """
    from instructune.data.templates import end_of_turn_token_ids

    recorded = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [recorded] if isinstance(recorded, int) else list(recorded or [])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    ids += end_of_turn_token_ids(tokenizer, template) if template else []
    others = [i for i in ids if i != tokenizer.eos_token_id]
    return others[0] if others else tokenizer.eos_token_id
