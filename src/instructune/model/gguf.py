"""GGUF files converted once into a plain fp32 safetensors folder in the cache, then loaded from there.

GGUF files are slow to read (every weight is de-quantised in numpy: ~10 s for 135M parameters) and a
GGUF-loaded model cannot be saved, so the first load writes a converted folder into
`$INSTRUCTUNE_CACHE/gguf/` (default `~/.cache/instructune/gguf/`; the fp32 weights take about
4 bytes per parameter) and every later load reads that folder, which takes well under a second.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from instructune.cache import cache_dir
from instructune.disk import disk_full_error, is_disk_full
from instructune.errors import UserError
from instructune.model.quiet import one_line, quiet_loading

_CACHE_FORMAT = 1  # bump when the converted folder's layout changes, so old caches are not reused
_ABANDONED_AFTER_S = 3600
_MARKER = "instructune_conversion.json"  # written last: a folder without it is not a finished conversion
_SUBFOLDER = "gguf"  # converted folders live in cache_dir() / _SUBFOLDER


def converted_folder(gguf: Path) -> Path:
    """The cache folder for a GGUF file's conversion, keyed by its absolute path, size and mtime."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}\0{_CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / _SUBFOLDER / f"{gguf.stem}-{digest}"


def is_converted_folder(path: Path, gguf_name: str | None = None) -> bool:
    """Whether `path` is named like a converted folder (of the GGUF file `gguf_name`, if given), in the
    cache of this machine or of any other; whether it exists is not checked."""
    if path.parent.name != _SUBFOLDER:
        return False
    return gguf_name is None or path.name.startswith(f"{Path(gguf_name).stem}-")


def convert_gguf(gguf: Path) -> Path:
    """The converted folder of a GGUF file, converting it on first use; safe against crashes and races.

    The conversion is written into a temporary folder next to its final place and renamed into place in
    one `os.replace`, so the cache folder either does not exist or is complete.
    """
    folder = converted_folder(gguf)
    if _is_whole(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_work(folder)
    if folder.exists():
        if _is_whole(folder):
            return folder  # another process has just finished it
        # Renames are atomic, so a folder without the marker, or with a file that is not the size written,
        # was damaged or edited since: convert again.
        shutil.rmtree(folder, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(work, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        _write_conversion(gguf.resolve(), work)
        try:
            os.replace(work, folder)
        except OSError:
            if not (folder / _MARKER).is_file():
                raise
            # Another process finished the same conversion first; its folder is as good as ours.
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _is_whole(folder: Path) -> bool:
    """Whether `folder` is a finished conversion whose files are all the sizes they were written at."""
    try:
        marker = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
        return all((folder / name).stat().st_size == size for name, size in marker.get("files", {}).items())
    except (OSError, ValueError, AttributeError):
        return False


def _remove_abandoned_work(folder: Path) -> None:
    """Delete temporary folders that a killed conversion of `folder` left behind (each is as big as the model)."""
    # An hour is far longer than any conversion takes, so a folder that old is not another process's live work.
    for work in folder.parent.glob(f".{folder.name}.*.tmp"):
        try:
            if time.time() - work.stat().st_mtime > _ABANDONED_AFTER_S:
                shutil.rmtree(work, ignore_errors=True)
        except OSError:
            pass  # gone already: another process cleaned it up


def _write_conversion(gguf: Path, out: Path) -> None:
    """Read a GGUF model and tokenizer, check their conversion round-trips, and save them into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_file(gguf)
    with quiet_loading(gguf=True):
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **_dequantize_kwargs())
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"cannot read the GGUF file {gguf}: {one_line(error)}") from None
        # A GGUF-loaded model refuses `save_pretrained`: rebuild a plain model from its config without the
        # quantisation entry, on the meta device so no time goes into random weights that are replaced anyway.
        config = copy.deepcopy(gguf_model.config)
        config.__dict__.pop("quantization_config", None)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        plain.tie_weights()  # `assign` replaced the shared parameter with two; tie them again
        plain.generation_config = copy.deepcopy(gguf_model.generation_config)
        try:
            plain.save_pretrained(out)
            tokenizer.save_pretrained(out)
        except Exception as error:  # OSError, or safetensors' own error type for a full disk
            if is_disk_full(error):
                needed = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
                raise disk_full_error(out.parent, needed, hint="set INSTRUCTUNE_CACHE to a folder with room "
                                      "for the converted model") from None
            if not isinstance(error, OSError):
                raise
            raise UserError(f"cannot write the converted model into {out.parent}: {one_line(error)} (set "
                            "INSTRUCTUNE_CACHE to a folder with room for it)") from None
        del plain
        _check_conversion(gguf_model, tokenizer, out)
    stat = gguf.stat()
    # The sizes of the files written: a converted folder cut short or damaged later is found and made again.
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    marker = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": _CACHE_FORMAT,
              "files": files}
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def check_gguf_file(gguf: Path) -> None:
    """A `UserError` naming `gguf` when it is not a whole GGUF file: a header that does not parse, or tensors
    whose data runs past the end of the file (a download or copy cut short)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return  # transformers asks for the `gguf` package itself, with its own message
    size = gguf.stat().st_size
    try:
        reader = GGUFReader(gguf)
        end = max((tensor.data_offset + tensor.n_bytes for tensor in reader.tensors), default=0)
    except Exception as error:  # the reader fails in many ways on a cut file (struct, numpy, index errors)
        raise UserError(f"{gguf} is not a readable GGUF file ({size:,} bytes): it is damaged or cut short "
                        f"({one_line(error) or type(error).__name__}); download or copy it again") from None
    if end > size:
        raise UserError(f"{gguf} is cut short: its tensors need {end:,} bytes, the file has {size:,}; download "
                        "or copy it again")


def _dequantize_kwargs() -> dict:
    # Newer transformers may keep GGUF weights packed when the `kernels` package is installed; ask for
    # plain fp32 weights, which is what the converted folder must hold.
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _check_conversion(gguf_model, tokenizer, out: Path) -> None:
    """Reload the converted folder and make sure it is the same model and tokenizer as the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    if model.config.tie_word_embeddings:
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError(f"GGUF conversion in {out}: the tied output embeddings came back untied")
    reloaded = AutoTokenizer.from_pretrained(out)
    for attribute in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        if getattr(reloaded, attribute) != getattr(tokenizer, attribute):
            raise RuntimeError(f"GGUF conversion in {out}: the tokenizer's {attribute} changed")
    sample = "Hello! What is the capital of France?"
    ids = tokenizer(sample).input_ids
    if reloaded(sample).input_ids != ids:
        raise RuntimeError(f"GGUF conversion in {out}: the tokenizer encodes differently")
    with torch.no_grad():
        expected = gguf_model(torch.tensor([ids])).logits
        got = model(torch.tensor([ids])).logits
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"GGUF conversion in {out}: logits differ by {(expected - got).abs().max():.3g}")
