"""Engine tokenizers in this process, for workers, remote engines and the plan's window check;
transformers is imported only when one is loaded."""

from __future__ import annotations

import functools

from cordgen.config import EngineSettings, resolve_model_source


@functools.cache
def load_tokenizer(settings: EngineSettings):
    """The engine's tokenizer in this process, for engines whose model lives elsewhere; loaded
    once, for the plan's window check and the roles alike."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_model_source(settings.tokenizer or settings.model),
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
    )
