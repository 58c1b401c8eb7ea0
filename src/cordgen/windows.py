"""Context windows, checked before a run starts.

Each role needs room in its engine's window: a teacher for its prompt, a whole step and then a
whole answer; the scorer for its prompt, the answer suffix and the gold answer. A recipe that
leaves no room even for the longest question's first step is refused with the numbers. Where
the thinking budget is larger than a window allows, the run still goes ahead: each beam closes
when its own next step or answer would not fit (`closed_by: context`), so that is the budget in
effect, and the plan says what it comes to for the longest question. Per-beam closing, rather
than one budget cut to the longest question, keeps a problem's records independent of which
other problems share its input or shard.
"""

from __future__ import annotations

from collections.abc import Sequence

from cordgen.config import EngineSettings, Recipe, resolve_model_source
from cordgen.engines.tokenizers import load_tokenizer
from cordgen.errors import ConfigError
from cordgen.problems import Problem
from cordgen.prompts import ChatPrompt

PROBED = 8  # the longest questions (and answers), by characters, whose prompts are measured


def position_limit(settings: EngineSettings) -> int | None:
    """The model's own maximum length (max_position_embeddings), where its config says it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            resolve_model_source(settings.model),
            revision=settings.revision,
            trust_remote_code=settings.trust_remote_code,
        )
    except (OSError, ValueError):
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    return int(limit) if limit else None


def engine_window(name: str, settings: EngineSettings) -> int | None:
    """The window vLLM will give the engine: max_model_len, else the model's own limit."""
    limit = position_limit(settings)
    if settings.max_model_len is not None and limit is not None and settings.max_model_len > limit:
        raise ConfigError(
            f"{name} ({settings.model}): max_model_len {settings.max_model_len} exceeds the model's "
            f"{limit} (max_position_embeddings)"
        )
    return settings.max_model_len or limit


def thinking_room(name: str, window: int, used: int, detail: str) -> int:
    """The tokens of thinking a window leaves beside `used`; refusal when it leaves none."""
    left = window - used
    if left <= 0:
        raise ConfigError(
            f"{name}: max_model_len {window} leaves no room to think on the longest question "
            f"({detail} take {used}); raise max_model_len or lower those limits"
        )
    return left


def capped_note(rooms: dict[str, int], budget: int) -> list[str]:
    """One line naming the roles whose window leaves less thinking than the budget, if any."""
    capped = {name: left for name, left in rooms.items() if left < budget}
    if not capped:
        return []
    listed = ", ".join(f"{name} {left}" for name, left in capped.items())
    return [
        f"context windows leave less thinking than thinking_budget {budget} on the longest question "
        f"({listed} tokens): a beam closes (closed_by: context) when its next step or answer would not fit"
    ]


def window_notes(recipe: Recipe, problems: Sequence[Problem]) -> list[str]:
    """A note when windows cap the thinking budget; ConfigError where one leaves no room."""
    longest = sorted(problems, key=lambda p: len(p.question), reverse=True)[:PROBED]
    longest += sorted(problems, key=lambda p: len(p.answer), reverse=True)[:PROBED]
    rooms: dict[str, int] = {}
    for role in recipe.teachers:
        window = engine_window(role.name, role.engine)
        if window is None:
            continue
        chat = ChatPrompt(load_tokenizer(role.engine), role.chat, recipe.format)
        prompt = max(len(chat.step_prompt_ids(p.question, ())) for p in longest)
        step, answer = role.sampling.max_step_tokens, role.sampling.max_answer_tokens
        detail = f"a {prompt}-token prompt, max_step_tokens {step} and max_answer_tokens {answer}"
        rooms[role.name] = thinking_room(role.name, window, prompt + step + answer, detail)
    scorer = recipe.scorer
    window = engine_window(scorer.name, scorer.engine)
    if window is not None:
        chat = ChatPrompt(load_tokenizer(scorer.engine), scorer.chat, recipe.format)
        prompts = [chat.scoring_ids(p.question, (), scorer.answer_suffix, p.answer) for p in longest]
        prompt = max(len(context) + len(answer) for context, answer in prompts)
        detail = f"a {prompt}-token scoring prompt with the answer"
        rooms[scorer.name] = thinking_room(scorer.name, window, prompt + 1, detail)
    return capped_note(rooms, recipe.search.thinking_budget)
