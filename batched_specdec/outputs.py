"""``OUTPUT_DIR/outputs.jsonl``: the CLI's generation results, one line per prompt as soon as it finishes, and resume.

A run without a baseline (``--no-baseline``, the data-generation use) appends each prompt's result to
``outputs.jsonl`` the moment the prompt finishes and flushes it, so a crash (``SIGKILL``, out of memory, Ctrl-C)
loses only the prompts that were in flight. ``--resume`` continues such a run in the same ``OUTPUT_DIR``: the
prompts already written are skipped, a half-written last line is dropped, and the options that change outputs must
match the interrupted run's, which ``run.json`` beside it records (with a digest of the prompts).

A line holds the prompt's index in the prompt set, the input's own fields (a JSONL prompt's ``id`` and metadata),
the completion text, the number of generated tokens, the finish reason (``stop`` or ``length``) and, with
``--logprobs``, each token's log-probability. Under ``accelerate launch`` each process writes its own file
(``outputs.process1.jsonl``, ...) and a resume reads them all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from batched_specdec.checks import OptionError
from batched_specdec.config import RunConfig, flag

OUTPUTS_NAME = "outputs.jsonl"
RUN_NAME = "run.json"

OUTPUT_KEYS = ("index", "completion", "generated_tokens", "finish_reason", "logprobs")
"""The keys a line of ``outputs.jsonl`` adds to the input's own fields (an input field of one of these names is
refused when the prompts load)."""

MATCHING_OPTIONS = ("target", "draft", "ngram_max", "ngram_min", "gamma", "gamma_max", "max_new_tokens",
                    "temperature", "top_k", "top_p", "seed", "sampling_scheme", "dtype", "attn_implementation",
                    "logprobs")
"""Options a resumed run must share with the run it continues: the ones that can change what is written (the
batch size, the schedule and the attention backend cannot: outputs are the same whatever they are)."""


def outputs_path(output_dir: str | Path, process_index: int = 0) -> Path:
    """This process' ``outputs.jsonl`` (``outputs.process{k}.jsonl`` for process k > 0 under accelerate)."""
    name = OUTPUTS_NAME if process_index == 0 else f"outputs.process{process_index}.jsonl"
    return Path(output_dir) / name


def prompts_digest(texts: list[str], fields: list[dict]) -> str:
    """A digest of the prompt set (texts and fields, in order): what a resumed run must decode again."""
    h = hashlib.sha256()
    for text, extra in zip(texts, fields):
        h.update(json.dumps([text, extra], sort_keys=True).encode())
    return h.hexdigest()


def check_reserved_fields(fields: list[dict], where: list[str]) -> None:
    """An input field that a line of ``outputs.jsonl`` would overwrite is an error naming the prompt's line."""
    for extra, place in zip(fields, where):
        clash = sorted(set(extra) & set(OUTPUT_KEYS))
        if clash:
            raise OptionError(f"{place}: field {clash[0]!r} is written by the output ({', '.join(OUTPUT_KEYS)}); "
                              "rename it in the prompts file")


def read_done(output_dir: str | Path) -> dict[int, dict]:
    """The prompts that every ``outputs*.jsonl`` in ``output_dir`` holds, by index. A line is written whole with its
    newline in one call, so a last line without one was cut short by a crash: it is cut off the file. A broken line
    anywhere else is an error."""
    done: dict[int, dict] = {}
    for path in sorted(Path(output_dir).glob("outputs*.jsonl")):
        data = path.read_bytes()
        complete = data.rfind(b"\n") + 1  # the bytes up to the last newline
        for number, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                done[int(record["index"])] = record
            except (ValueError, KeyError, TypeError) as exc:
                raise OptionError(f"{path} line {number} is not an output record ({exc}); remove it to resume") from exc
        if complete < len(data):
            with path.open("r+b") as f:
                f.truncate(complete)
    return done


def prepare(config: RunConfig, digest: str, num_prompts: int) -> set[int]:
    """Check ``config.output_dir`` for a generation run and return the prompt indices already written there.

    Without ``--resume`` an existing ``outputs.jsonl`` is an error (a new run would mix with it); with it, the
    options in :data:`MATCHING_OPTIONS` and the prompts must match ``run.json``'s. Writes ``run.json`` for a new
    run."""
    out_dir = Path(config.output_dir)
    existing = sorted(out_dir.glob("outputs*.jsonl"))
    run_file = out_dir / RUN_NAME
    if not config.resume:
        if existing:
            raise OptionError(f"{existing[0]} already holds results: pass --resume to continue that run, or choose "
                              "another --output-dir")
        out_dir.mkdir(parents=True, exist_ok=True)
        recorded = {key: getattr(config, key) for key in MATCHING_OPTIONS}
        run_file.write_text(json.dumps({"options": recorded, "prompts_digest": digest,
                                        "num_prompts": num_prompts}, indent=2))
        return set()
    if not run_file.is_file():
        raise OptionError(f"--resume: {run_file} does not exist (no generation run to continue in --output-dir "
                          f"{str(out_dir)!r})")
    run = json.loads(run_file.read_text())
    for key in MATCHING_OPTIONS:
        before, now = run["options"].get(key, getattr(RunConfig, key, None)), getattr(config, key)
        if before != now:
            raise OptionError(f"--resume: {flag(key)} is {now!r} but the run in {str(out_dir)!r} used {before!r}; "
                              "resume with the same options, or start a new run in another --output-dir")
    if run["prompts_digest"] != digest:
        raise OptionError(f"--resume: the prompts differ from the run in {str(out_dir)!r} ({run['num_prompts']} "
                          "prompts): resume with the same --prompts and --num-prompts")
    done = read_done(out_dir)
    beyond = sorted(i for i in done if not 0 <= i < num_prompts)
    if beyond:
        raise OptionError(f"--resume: {existing[0]} holds prompt index {beyond[0]}, outside the {num_prompts} prompts")
    return set(done)


class OutputWriter:
    """Appends one line per finished prompt to this process' ``outputs.jsonl`` and flushes it at once."""

    def __init__(self, path: Path, tokenizer, indices: list[int], fields: list[dict]) -> None:
        """``indices[j]`` and ``fields[j]``: the prompt-set index and input fields of the run's prompt ``j``."""
        self.path, self.tokenizer, self.indices, self.fields = path, tokenizer, indices, fields
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")
        self.written = 0

    def write(self, j: int, token_ids: list[int], finish_reason: str, logprobs: list[float] | None) -> None:
        """The line of the run's prompt ``j``."""
        record = {"index": self.indices[j], **self.fields[j],
                  "completion": self.tokenizer.decode(token_ids, skip_special_tokens=True),
                  "generated_tokens": len(token_ids), "finish_reason": finish_reason}
        if logprobs is not None:
            record["logprobs"] = logprobs
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        self.written += 1

    def close(self) -> None:
        self.file.close()
