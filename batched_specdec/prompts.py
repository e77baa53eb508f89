"""Prompt sets for the CLI: the built-in chat prompts, prompt files, and chat-template encoding."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from batched_specdec.checks import OptionError


class PromptFileError(OptionError):
    """A prompts file that cannot be read or parsed; the message is one line naming the file (and line)."""


BUILTIN_NUM_PROMPTS = 8
"""Prompts of the built-in set the CLI decodes when ``--num-prompts`` is not given (a prompt file is decoded whole)."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt set: its text, the other fields of its JSONL object (an ``id``, metadata; they come
    back with its output), and where it came from (``line`` in ``source``, 1-based)."""

    text: str
    fields: dict = field(default_factory=dict)
    source: str = "built-in prompts"
    line: int = 0

    @property
    def where(self) -> str:
        """``"line 7 of prompts.jsonl"``: how an error names the prompt."""
        return f"line {self.line} of {self.source}"


def builtin_prompts() -> list[str]:
    """The prompt set shipped with the package: varied chat prompts (code, explanation, lists, rewriting, math
    word problems, and a few that repeat or edit a given text, which n-gram drafting exploits)."""
    return [r.text for r in builtin_prompt_records()]


def builtin_prompt_records() -> list[PromptRecord]:
    """:func:`builtin_prompts` as records."""
    text = resources.files("batched_specdec").joinpath("data/prompts.jsonl").read_text(encoding="utf-8")
    return _parse_jsonl(text, "built-in prompts")


def _parse_jsonl(text: str, name: str) -> list[PromptRecord]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PromptFileError(f"{name} line {lineno}: not valid JSON ({exc.msg})") from exc
        if isinstance(row, str):
            records.append(PromptRecord(row, {}, name, lineno))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise PromptFileError(f'{name} line {lineno}: expected a JSON object with a string "prompt" field')
        records.append(PromptRecord(row["prompt"], {k: v for k, v in row.items() if k != "prompt"}, name, lineno))
    return records


def read_prompts_file(path: str | Path) -> list[str]:
    """The texts of :func:`read_prompt_records`."""
    return [r.text for r in read_prompt_records(path)]


def read_prompt_records(path: str | Path) -> list[PromptRecord]:
    """Read prompts from a text file (one prompt per non-empty line) or a JSONL file (a ``"prompt"`` field per line;
    every other field is kept in :attr:`PromptRecord.fields`).

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
        records = _parse_jsonl(text, f"prompts file {str(path)!r}")
    else:
        records = [PromptRecord(line.strip(), {}, f"prompts file {str(path)!r}", lineno)
                   for lineno, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not records:
        raise PromptFileError(f"prompts file {str(path)!r} holds no prompts")
    return records


def select_prompts(prompts: list, num_prompts: int | None, source: str = "the prompt set") -> list:
    """The first ``num_prompts`` prompts (all with None); asking for more than there are is an error, never a
    cycle through the list."""
    if num_prompts is None:
        return list(prompts)
    if num_prompts > len(prompts):
        raise OptionError(f"--num-prompts {num_prompts} asks for more prompts than {source} holds ({len(prompts)})")
    return list(prompts[:num_prompts])


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
