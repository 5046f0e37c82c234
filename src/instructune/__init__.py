"""instructune: instruction tuning of causal language models with exact instruction masking.

The public API (`instructune.api`), importable from here; each name loads its module on first use, so
`import instructune` stays cheap:

    import instructune

    data = instructune.encode("data.jsonl", "HuggingFaceTB/SmolLM2-135M-Instruct")   # masks + report
    data.to_hf()                                   # a datasets.Dataset for TRL's SFTTrainer or Trainer
    result = instructune.train(data="data.jsonl", epochs=1)    # the run `instructune train` makes
    model = instructune.load(result.checkpoint)
    instructune.generate(model, "Which is the largest ocean?")
"""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

IGNORE_INDEX = -100
"""The label of a token that is read but never scored (Hugging Face / PyTorch convention)."""

_LAZY = {
    "encode": "instructune.api",
    "save_prepared": "instructune.api",
    "load": "instructune.api",
    "explain": "instructune.api",
    "evaluate": "instructune.api",
    "generate": "instructune.api",
    "export_gguf": "instructune.api",
    "EvalResult": "instructune.api",
    "Collator": "instructune.data.collator",
    "Conversation": "instructune.data.conversation",
    "Message": "instructune.data.conversation",
    "EncodingOptions": "instructune.data.options",
    "EncodedRow": "instructune.data.encoded",
    "PreparationReport": "instructune.data.encoded",
    "PreparedDataset": "instructune.data.prepare",
    "TrainConfig": "instructune.train.config",
    "TrainResult": "instructune.train.loop",
    "LoadedModel": "instructune.use.loading",
    "Explanation": "instructune.use.explain",
    "UserError": "instructune.errors",
}
"""Each public name and the module that defines it."""

__all__ = ["IGNORE_INDEX", "__version__", "train", "encode", "save_prepared", "load", "explain", "evaluate",
           "generate", "export_gguf", "EvalResult", "Collator", "Conversation", "Message", "EncodingOptions",
           "EncodedRow", "PreparationReport", "PreparedDataset", "TrainConfig", "TrainResult", "LoadedModel",
           "Explanation", "UserError"]


class _TrainPackage(types.ModuleType):
    """The `instructune.train` sub-package, callable as the `train` function of the API.

    `instructune.train` names both: the package (`import instructune.train.loop`) and the function
    (`from instructune import train; train(epochs=1)`). Python sets a package's attribute to its
    sub-package whenever that is imported, so a function of that name would be replaced at random; the
    package itself is made callable instead, so both meanings hold whatever was imported first.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from instructune.api import train as run_training

        return run_training(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        from instructune.api import train as run_training

        return inspect.signature(run_training)


from instructune import train  # noqa: E402  (the sub-package: a docstring, nothing else runs)

train.__class__ = _TrainPackage

if TYPE_CHECKING:
    from instructune.api import (
        EvalResult,
        encode,
        evaluate,
        explain,
        export_gguf,
        generate,
        load,
        save_prepared,
    )
    from instructune.data.collator import Collator
    from instructune.data.conversation import Conversation, Message
    from instructune.data.encoded import EncodedRow, PreparationReport
    from instructune.data.options import EncodingOptions
    from instructune.data.prepare import PreparedDataset
    from instructune.errors import UserError
    from instructune.train.config import TrainConfig
    from instructune.train.loop import TrainResult
    from instructune.use.explain import Explanation
    from instructune.use.loading import LoadedModel


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once loaded, an ordinary attribute
        return value
    raise AttributeError(f"module 'instructune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
