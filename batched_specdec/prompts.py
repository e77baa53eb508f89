"""Prompt sets for the CLI: the built-in chat prompts, prompt files, and chat-template encoding."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from batched_specdec.checks import OptionError


class PromptFileError(OptionError):
    """A prompts file that cannot be read or parsed; the message is one line naming the file (and line)."""


def builtin_prompts() -> list[str]:
    """The prompt set shipped with the package: varied chat prompts (code, explanation, lists, rewriting, math
    word problems, and a few that repeat or edit a given text, which n-gram drafting exploits)."""
    text = resources.files("batched_specdec").joinpath("data/prompts.jsonl").read_text(encoding="utf-8")
    return _parse_jsonl(text, "built-in prompts")


def _parse_jsonl(text: str, name: str) -> list[str]:
    prompts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PromptFileError(f"{name} line {lineno}: not valid JSON ({exc.msg})") from exc
        if isinstance(row, str):
            prompts.append(row)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise PromptFileError(f'{name} line {lineno}: expected a JSON object with a string "prompt" field')
        prompts.append(row["prompt"])
    return prompts


def read_prompts_file(path: str | Path) -> list[str]:
    """Read prompts from a text file (one prompt per non-empty line) or a JSONL file (a ``"prompt"`` field per line).

    A file is JSONL when its name ends in ``.jsonl`` or its first non-empty line starts with ``{``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise PromptFileError(f"prompts file {str(path)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"cannot read prompts file {str(path)!r}: {exc}") from exc
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if path.suffix.lower() == ".jsonl" or first.startswith("{"):
        prompts = _parse_jsonl(text, f"prompts file {str(path)!r}")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(f"prompts file {str(path)!r} holds no prompts")
    return prompts


def select_prompts(prompts: list[str], num_prompts: int) -> list[str]:
    """The first ``num_prompts`` prompts, cycling through the list when it is shorter."""
    return [prompts[i % len(prompts)] for i in range(num_prompts)]


def encode_prompts(tokenizer, prompts: list[str], *, chat_template: bool | None = None) -> list[list[int]]:
    """Token ids of each prompt, as a single user turn of the chat template when the tokenizer has one."""
    use_template = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    encoded = []
    for prompt in prompts:
        if use_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        encoded.append(list(ids))
    return encoded
