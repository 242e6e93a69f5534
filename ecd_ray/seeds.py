"""Read seed instructions from JSONL or Parquet, validate them, give them stable ids.

Every input row ends in exactly one of two places: the valid seeds, or the rejects with a
reason (``invalid_utf8``, ``invalid_json``, ``not_an_object``, ``missing_column``,
``empty_instruction``, ``not_a_string``, ``instruction_too_long``, ``duplicate_id``,
``duplicate_instruction``, ``duplicate_key``, ``invalid_unicode``). Nothing is dropped
silently.

* ``invalid_utf8``: a JSONL line, or a Parquet row's value, that is not valid UTF-8.
* ``invalid_json``: a line that is not JSON, including JSON nested too deeply for the parser
  or holding an integer of more digits than Python converts (4300).
* ``duplicate_key``: a JSON object that names the instruction, response or id field more than
  once (parsers disagree on which value counts).
* ``invalid_unicode``: the instruction, response or id holds a lone surrogate (JSON's
  ``"\\ud800"`` escape decodes to one), which UTF-8, and so every later writer, cannot encode.

A UTF-8 byte-order mark at the start of a JSONL file is not data and is skipped; CRLF line
ends are fine (JSON allows the ``\\r``). A folder is read one level deep: its ``*.jsonl``,
``*.json`` and ``*.parquet`` files in name order (``seeds.format=auto``); other files and
subfolders are not read.

Reading streams (:func:`iter_seeds`): memory does not grow with the rows' text, only by a
few bytes a seed for de-duplication.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ecd_ray.config import SeedsConfig
from ecd_ray.idset import IdSet
from ecd_ray.schema import reject


@dataclass
class SeedReadResult:
    """Valid seeds (rows of ``schema.SEEDS``), rejects (rows of ``schema.REJECTS``), counts."""

    seeds: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    rows_read: int = 0


def normalize(text: str) -> str:
    """The form two instructions are compared in: NFC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def content_id(instruction: str) -> str:
    """A stable id from the instruction's content: 16 hex digits of SHA-256."""
    return hashlib.sha256(normalize(instruction).encode("utf-8")).hexdigest()[:16]


def _seed_files(path: Path, fmt: str) -> list[tuple[Path, str]]:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        kind = fmt
        if kind == "auto":
            suffix = f.suffix.lower()
            kind = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix, "")
        if kind:
            out.append((f, kind))
    if not out:
        raise ValueError(f"no .jsonl or .parquet seed files in {path} (set seeds.format)")
    return out


def _display_name(path: Path) -> str:
    """``path``'s name as text UTF-8 can encode (undecodable bytes of a name become U+FFFD),
    so that a row's ``source`` can always be written."""
    return os.fsencode(path.name).decode("utf-8", errors="replace")


class _JSONObject(dict[str, Any]):
    """A decoded JSON object that remembers the names it held more than once."""

    repeated: frozenset[str] = frozenset()


def _json_object(pairs: list[tuple[str, Any]]) -> _JSONObject:
    obj = _JSONObject(pairs)
    if len(obj) != len(pairs):  # json.loads would silently keep the last value
        obj.repeated = frozenset(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    return obj


def _parse_json(text: str) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, why)`` for a line that is not JSON Python can hold."""
    try:
        return json.loads(text, object_pairs_hook=_json_object), None
    except json.JSONDecodeError as exc:
        return None, exc.msg
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        return None, str(exc)
    except RecursionError:
        return None, "nested too deeply"


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, dict[str, Any] | None]]:
    """Yield (source, row, reject) for each non-blank line; exactly one of row/reject is set."""
    name = _display_name(path)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            source = f"{name}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                shown = raw.decode("utf-8", errors="replace")
                yield source, None, reject(
                    "seed", "invalid_utf8", f"line is not valid UTF-8 ({exc.reason} at byte "
                    f"{exc.start})", source=source, raw=shown
                )
                continue
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark (Windows tools write it)
            if not text.strip():
                continue
            row, why = _parse_json(text)
            if why is not None:
                yield source, None, reject(
                    "seed", "invalid_json", f"line is not valid JSON: {why}", source=source,
                    raw=text.strip()
                )
                continue
            if not isinstance(row, dict):
                yield source, None, reject(
                    "seed", "not_an_object", f"line holds a JSON {type(row).__name__}, not an"
                    " object", source=source, raw=text.strip()
                )
                continue
            yield source, row, None


def _batch_rows(batch: pa.RecordBatch) -> Iterator[dict[str, Any] | None]:
    """The batch's rows as dicts; None for a row holding a string that is not valid UTF-8
    (Arrow does not check what a Parquet writer stored, Python's conversion does)."""
    try:
        yield from batch.to_pylist()
        return
    except UnicodeDecodeError:
        pass
    for i in range(batch.num_rows):  # the slow path, only for a batch with a bad value
        try:
            yield batch.slice(i, 1).to_pylist()[0]
        except UnicodeDecodeError:
            yield None


def _parquet_rows(
    path: Path, cfg: SeedsConfig
) -> Iterator[tuple[str, dict[str, Any] | None, dict[str, Any] | None]]:
    name = _display_name(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    with pf:
        names = pf.schema_arrow.names
        if cfg.instruction_column not in names:
            raise ValueError(
                f"{path}: no column '{cfg.instruction_column}' (seeds.instruction_column); "
                f"columns are {names}"
            )
        wanted = [c for c in (cfg.instruction_column, cfg.response_column, cfg.id_column) if c]
        wanted = [c for c in dict.fromkeys(wanted) if c in names]
        if twice := [c for c in wanted if names.count(c) > 1]:
            raise ValueError(f"{path}: column(s) {twice} appear more than once; which one holds "
                             "the seeds is ambiguous: rename the others")
        index = 0
        try:
            for batch in pf.iter_batches(columns=wanted, batch_size=4096):
                for row in _batch_rows(batch):
                    index += 1
                    source = f"{name}:row{index}"
                    if row is None:
                        yield source, None, reject(
                            "seed", "invalid_utf8", "a value of the row is not valid UTF-8",
                            source=source)
                    else:
                        yield source, row, None
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path}: unreadable after row {index} ({exc})") from None


def _columns(cfg: SeedsConfig) -> set[str]:
    return {c for c in (cfg.instruction_column, cfg.response_column, cfg.id_column) if c}


def _lone_surrogate(text: str) -> int | None:
    """The index of ``text``'s first lone surrogate, or None when UTF-8 can encode it all."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _validate(
    row: dict[str, Any], source: str, cfg: SeedsConfig
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    col = cfg.instruction_column
    if col not in row:
        return None, reject(
            "seed", "missing_column", f"row has no '{col}' field (seeds.instruction_column); "
            f"fields: {sorted(row)[:10]}", source=source, raw=json.dumps(row)[:1000]
        )
    if twice := sorted(getattr(row, "repeated", set()) & _columns(cfg)):
        return None, reject(
            "seed", "duplicate_key", f"the object names {twice} more than once", source=source,
            raw=json.dumps(row)[:1000]
        )
    instruction = row[col]
    if not isinstance(instruction, str):
        return None, reject(
            "seed", "not_a_string", f"'{col}' is a {type(instruction).__name__}, not a string",
            source=source, raw=repr(instruction)
        )
    response = row.get(cfg.response_column) if cfg.response_column else None
    given_id = row.get(cfg.id_column) if cfg.id_column else None
    for key, value in ((col, instruction), (cfg.response_column, response),
                       (cfg.id_column, given_id)):
        if isinstance(value, str) and (at := _lone_surrogate(value)) is not None:
            return None, reject(
                "seed", "invalid_unicode", f"'{key}' holds a lone surrogate "
                f"(U+{ord(value[at]):04X} at character {at}), which UTF-8 cannot encode",
                source=source, raw=value.encode("utf-8", "backslashreplace").decode("utf-8")
            )
    instruction = instruction.strip()
    if not instruction:
        return None, reject("seed", "empty_instruction", f"'{col}' is empty", source=source)
    if len(instruction) > cfg.max_instruction_chars:
        return None, reject(
            "seed", "instruction_too_long", f"instruction has {len(instruction)} characters; "
            f"seeds.max_instruction_chars is {cfg.max_instruction_chars}", source=source,
            raw=instruction
        )
    if response is not None and (not isinstance(response, str) or not response.strip()):
        response = None  # an unusable supplied answer: the teacher answers R0 instead
    seed_id = str(given_id) if given_id not in (None, "") else content_id(instruction)
    return {
        "seed_id": seed_id,
        "source": source,
        "instruction": instruction,
        "response": response.strip() if response else None,
    }, None


def iter_seeds(cfg: SeedsConfig) -> Iterator[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """Stream every seed row named by ``cfg``: validate it and de-duplicate it.

    Yields, for each row read and in input order, exactly one of ``(seed, None)`` (a row of
    ``schema.SEEDS``) or ``(None, reject)`` (a row of ``schema.REJECTS``). At most
    ``cfg.limit`` rows are read (bad rows count too; blank JSONL lines are not rows).

    Lazy and memory-bounded: JSONL is read line by line, Parquet batch by batch, and what is
    remembered per seed is two 64-bit hashes (its id and its normalized instruction, in
    :class:`~ecd_ray.idset.IdSet`s: about 8-20 bytes a seed each). So a duplicate's reject
    cannot name the earlier row, and a 64-bit hash collision (chance about ``n**2 / 2**65``,
    3e-6 at 10M seeds) would reject a distinct seed as a duplicate.

    Raises ``ValueError``, naming the file, for problems with a whole file (no seed files; a
    Parquet file that cannot be read, lacks the instruction column or has a read column twice)
    when the reading reaches that file; problems with single rows become rejects.
    """
    seen_ids = IdSet()
    seen_text = IdSet()
    rows_read = 0
    for path, kind in _seed_files(Path(cfg.path), cfg.format):
        if cfg.limit is not None and rows_read >= cfg.limit:
            return
        rows = _jsonl_rows(path) if kind == "jsonl" else _parquet_rows(path, cfg)
        try:
            for source, row, bad in rows:
                rows_read += 1
                seed = None
                if row is not None:
                    seed, bad = _validate(row, source, cfg)
                if seed is None:
                    yield None, bad
                elif seed["seed_id"] in seen_ids:
                    yield None, reject(
                        "seed", "duplicate_id", "an earlier row has the same id",
                        seed_id=seed["seed_id"], source=source, raw=seed["instruction"]
                    )
                elif not seen_text.add(normalize(seed["instruction"])):
                    yield None, reject(
                        "seed", "duplicate_instruction", "an earlier row has the same "
                        "instruction (after NFC, case-folding and whitespace collapsing)",
                        seed_id=seed["seed_id"], source=source, raw=seed["instruction"]
                    )
                else:
                    seen_ids.add(seed["seed_id"])
                    yield seed, None
                if cfg.limit is not None and rows_read >= cfg.limit:
                    return
        finally:
            rows.close()


def read_seeds(cfg: SeedsConfig) -> SeedReadResult:
    """Collect :func:`iter_seeds` into lists: for tests and small inputs only (the whole
    input is held in memory; stream with :func:`iter_seeds` for large ones)."""
    result = SeedReadResult()
    for seed, bad in iter_seeds(cfg):
        result.rows_read += 1
        if seed is not None:
            result.seeds.append(seed)
        else:
            result.rejects.append(bad)
    return result
