"""The `checkpoint` state file, latest_checkpoint, and tf.train.Saver's retention.

The state file is TensorFlow's CheckpointState (checkpoint_state.proto) in
protobuf text format, the file TensorFlow's get_checkpoint_state, TensorBoard
and users' scripts read:

    model_checkpoint_path: "model-3"
    all_model_checkpoint_paths: "model-2"
    all_model_checkpoint_paths: "model-3"
    all_model_checkpoint_timestamps: 1795740342.5
    all_model_checkpoint_timestamps: 1795740401.25
    last_preserved_timestamp: 1795736000.0

Four fields do not need a protobuf runtime: a small strict reader and writer
live here (tests hold them to protobuf's own text_format). State files that
TensorFlow wrote are read, and so is the JSON of shardsave 0.1. The file is
written whole through the storage layer (a temporary file renamed into place),
so a reader sees the old state or the new one, never a torn one. It names only
committed checkpoints: a checkpoint enters it after its index is written and
leaves it before its files are deleted.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from shardsave.errors import CorruptCheckpointError, ShardsaveError, StateFileWarning
from shardsave.formats.shardsave import Listing, decode_index, index_key, names_of_save_path, stem_of
from shardsave.storage import open_store
from shardsave.storage.base import DEFAULT_STORAGE_TIMEOUT_S, Store, join, location, split_prefix

STATE_FILENAME = "checkpoint"


@dataclass(frozen=True)
class CheckpointState:
    """The contents of a directory's `checkpoint` file.

    Attributes:
      model_checkpoint_path: the newest checkpoint's prefix.
      all_model_checkpoint_paths: the checkpoints retention keeps, oldest first.
      all_model_checkpoint_timestamps: their save times (seconds since the epoch).
      last_preserved_timestamp: when keep_checkpoint_every_n_hours last kept one.
    """

    model_checkpoint_path: str
    all_model_checkpoint_paths: tuple[str, ...] = ()
    all_model_checkpoint_timestamps: tuple[float, ...] = ()
    last_preserved_timestamp: float = 0.0


def _is_absolute(path: str) -> bool:
    return os.path.isabs(path) or "://" in path


_FIELDS = {
    "model_checkpoint_path": str,
    "all_model_checkpoint_paths": str,
    "all_model_checkpoint_timestamps": float,
    "last_preserved_timestamp": float,
}


_REPEATED = {"all_model_checkpoint_paths", "all_model_checkpoint_timestamps"}


_TOKEN = re.compile(
    r"""\s+|\#[^\n]*"""
    r"""|(?P<number>[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[fF]?|(?:inf(?:inity)?|nan)(?![A-Za-z0-9_])))"""
    r"""|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[:\[\],;])"""
    r"""|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')""",
    re.IGNORECASE,
)


_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", '"': b'"', "'": b"'", "\\": b"\\", "a": b"\a",
            "b": b"\b", "f": b"\f", "v": b"\v", "?": b"?"}  # fmt: skip


_ESCAPE = re.compile(
    r"""\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))""", re.S
)


def _unquote(literal: str) -> str:
    """A text-format string literal's value (C escapes; the bytes are UTF-8)."""

    def one(m: re.Match[str]) -> bytes:
        octal, hexa, u4, u8, char = m.groups()
        if octal or hexa:
            return bytes([int(octal, 8) if octal else int(hexa, 16)])
        if u4 or u8:
            return chr(int(u4 or u8, 16)).encode()
        if char not in _ESCAPES:
            raise ValueError(f"unknown escape \\{char} in {literal}")
        return _ESCAPES[char]

    inner, out, last = literal[1:-1], [], 0
    for m in _ESCAPE.finditer(inner):
        out += [inner[last : m.start()].encode(), one(m)]
        last = m.end()
    out.append(inner[last:].encode())
    return b"".join(out).decode("utf-8")


def _quote(value: str) -> str:
    """A text-format string literal, escaped as protobuf writes it (UTF-8 kept as is)."""
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\{ord(char):03o}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def parse_state_text(text: str) -> CheckpointState:
    """Parses a CheckpointState in protobuf text format; ValueError names what is wrong.

    Accepts what protobuf's text_format.Merge accepts for these four fields
    (comments, any order, `field: [a, b]` lists, adjacent string literals) and
    refuses unknown fields, as protobuf does.
    """
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected text at offset {pos}: {text[pos : pos + 20]!r}")
        pos = m.end()
        if m.lastgroup is not None:
            tokens.append((m.lastgroup, m.group()))
    values: dict[str, list[object]] = {name: [] for name in _FIELDS}
    i = 0

    def value(kind: type) -> object:
        nonlocal i
        if i >= len(tokens):
            raise ValueError("a value is missing at the end")
        token_kind, token = tokens[i]
        if kind is str:
            if token_kind != "string":
                raise ValueError(f"expected a string, found {token!r}")
            parts = []
            while i < len(tokens) and tokens[i][0] == "string":  # "a" "b" is "ab"
                parts.append(_unquote(tokens[i][1]))
                i += 1
            return "".join(parts)
        if token_kind != "number":
            raise ValueError(f"expected a number, found {token!r}")
        i += 1
        if token[-1] in "fF" and not token.lstrip("+-").lower().startswith("inf"):
            token = token[:-1]  # "1.5f": a float suffix, which protobuf allows
        return float(token)

    while i < len(tokens):
        kind, name = tokens[i]
        if kind != "name" or name not in _FIELDS:
            raise ValueError(f"unknown field {name!r} (a CheckpointState has {', '.join(_FIELDS)})")
        i += 1
        if i >= len(tokens) or tokens[i][1] != ":":
            raise ValueError(f"expected ':' after {name}")
        i += 1
        if i < len(tokens) and tokens[i][1] == "[" and name in _REPEATED:
            i += 1
            while i < len(tokens) and tokens[i][1] != "]":
                values[name].append(value(_FIELDS[name]))
                if i < len(tokens) and tokens[i][1] == ",":
                    i += 1
            if i >= len(tokens):
                raise ValueError(f"unclosed list of {name}")
            i += 1
        else:
            values[name].append(value(_FIELDS[name]))
        if i < len(tokens) and tokens[i][1] in ",;":
            i += 1
    model = values["model_checkpoint_path"]
    preserved = values["last_preserved_timestamp"]
    return CheckpointState(
        model_checkpoint_path=str(model[-1]) if model else "",  # Merge: the last one wins
        all_model_checkpoint_paths=tuple(str(p) for p in values["all_model_checkpoint_paths"]),
        all_model_checkpoint_timestamps=tuple(
            float(str(t)) for t in values["all_model_checkpoint_timestamps"]
        ),
        last_preserved_timestamp=float(str(preserved[-1])) if preserved else 0.0,
    )


def format_state_text(state: CheckpointState) -> str:
    """The CheckpointState in protobuf text format, as TensorFlow writes it (defaults omitted)."""
    lines = []
    if state.model_checkpoint_path:
        lines.append(f"model_checkpoint_path: {_quote(state.model_checkpoint_path)}")
    lines += [f"all_model_checkpoint_paths: {_quote(p)}" for p in state.all_model_checkpoint_paths]
    lines += [f"all_model_checkpoint_timestamps: {float(t)!r}" for t in state.all_model_checkpoint_timestamps]
    if state.last_preserved_timestamp:
        lines.append(f"last_preserved_timestamp: {float(state.last_preserved_timestamp)!r}")
    return "".join(line + "\n" for line in lines)


def read_state(directory: Store, filename: str = STATE_FILENAME) -> CheckpointState | None:
    """The state file as stored (paths as written), or None if there is none.

    An unreadable state file (empty, torn by a tool that wrote it in place, or
    not a state file) is treated as absent, with a StateFileWarning: the
    directory's listing says which checkpoints are committed, and the next save
    writes the file anew. It must never block a save or a restart.
    """
    try:
        return parse_state(directory, filename)
    except CorruptCheckpointError as e:
        warnings.warn(
            f"{e}; ignoring it: the checkpoints are found from the directory listing, and the "
            "next save rewrites it",
            StateFileWarning,
            stacklevel=3,
        )
        return None


def parse_state(directory: Store, filename: str = STATE_FILENAME) -> CheckpointState | None:
    """The state file as stored, None if there is none; CorruptCheckpointError if unreadable."""
    raw = directory.read_all(filename)
    if raw is None:
        return None
    where = join(directory.path, filename)
    try:
        text = raw.decode("utf-8")
        if text.lstrip().startswith("{"):  # shardsave 0.1 wrote JSON
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            state = CheckpointState(
                model_checkpoint_path=doc["model_checkpoint_path"],
                all_model_checkpoint_paths=tuple(doc["all_model_checkpoint_paths"]),
                all_model_checkpoint_timestamps=tuple(
                    float(t) for t in doc["all_model_checkpoint_timestamps"]
                ),
                last_preserved_timestamp=float(doc["last_preserved_timestamp"]),
            )
            if not all(
                isinstance(p, str) for p in (state.model_checkpoint_path, *state.all_model_checkpoint_paths)
            ):
                raise TypeError("paths must be strings")
        else:
            state = parse_state_text(text)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{where} is not a valid state file: {e}") from e
    if not state.model_checkpoint_path:
        raise CorruptCheckpointError(f"{where} is not a valid state file: it names no checkpoint")
    if "\0" in state.model_checkpoint_path or any("\0" in p for p in state.all_model_checkpoint_paths):
        raise CorruptCheckpointError(f"{where} is not a valid state file: a path holds NUL")
    return state


def write_state(directory: Store, state: CheckpointState, filename: str = STATE_FILENAME) -> None:
    directory.write(filename, format_state_text(state).encode()).result()


def get_checkpoint_state(checkpoint_dir: str, latest_filename: str | None = None) -> CheckpointState | None:
    """Reads the `checkpoint` state file of a directory.

    Relative paths in the file are returned joined to checkpoint_dir, as
    tf.train.get_checkpoint_state does. A state file that cannot be read is
    treated as absent, with a StateFileWarning.

    Args:
      checkpoint_dir: the directory holding the checkpoints (a path or URL).
      latest_filename: the state file's name (default "checkpoint").

    Returns:
      The state, or None when the directory has no state file.

    Examples:
      >>> import shardsave, tempfile
      >>> shardsave.get_checkpoint_state(tempfile.mkdtemp()) is None
      True
    """
    checkpoint_dir = location(checkpoint_dir)
    directory = open_store(checkpoint_dir)
    state = read_state(directory, latest_filename or STATE_FILENAME)
    if state is None:
        return None

    def full(p: str) -> str:
        return p if _is_absolute(p) else join(directory.path, p)

    return CheckpointState(
        model_checkpoint_path=full(state.model_checkpoint_path),
        all_model_checkpoint_paths=tuple(full(p) for p in state.all_model_checkpoint_paths),
        all_model_checkpoint_timestamps=state.all_model_checkpoint_timestamps,
        last_preserved_timestamp=state.last_preserved_timestamp,
    )


def is_committed(prefix: str) -> bool:
    directory, base = split_prefix(prefix)
    return bool(base) and open_store(directory).exists(index_key(base))


def unrecorded_commits(
    directory: Store, kept: list[tuple[str, float]], stem: str | None = None
) -> list[tuple[str, float]]:
    """Checkpoints committed after the state file was last written, oldest first.

    A process killed between writing a checkpoint's index and updating the state
    file (or writing the first one) leaves a committed checkpoint that the state
    file does not name. Only those newer than every recorded one count, so a
    checkpoint that keep_checkpoint_every_n_hours preserved (and the state file
    dropped) never does; with stem, only checkpoints named stem or stem-STEP. A
    checkpoint saved with write_state=False (its index says it is not to be
    recorded) never counts: it was kept out of the state file on purpose.
    """
    newest = max((t for _, t in kept), default=float("-inf"))
    recorded = {b for b, _ in kept}
    named = names_of_save_path(stem) if stem is not None else None
    found = []
    for base in sorted(Listing.of(directory).committed - recorded):
        if named is not None and not named.fullmatch(base):
            continue
        key = index_key(base)
        try:
            index = decode_index(directory.read_all(key) or b"", key)
        except ShardsaveError:
            continue  # not ours to judge, and never ours to delete
        created = index.created
        if index.recorded and created > newest:
            found.append((base, created))
    return sorted(found, key=lambda bt: bt[1])


def latest_checkpoint(checkpoint_dir: str, latest_filename: str | None = None) -> str | None:
    """The prefix of the newest committed checkpoint the state file names.

    A checkpoint of the state file's own save path committed after the file's last
    update (its saving process died in between) is newer than anything the file
    names, and is returned instead, so a restarted job neither loses it nor
    collides with its name. With no state file at all (a kill before the first was
    written) or an unreadable one, the newest committed checkpoint in the directory
    is returned. A checkpoint saved with write_state=False is never returned, as in
    TensorFlow.

    Args:
      checkpoint_dir: the directory holding the checkpoints (a path or URL).
      latest_filename: the state file's name (default "checkpoint").

    Returns:
      A prefix such as "ckpt/model-1000", or None if there is none.

    Examples:
      >>> import shardsave, tempfile
      >>> shardsave.latest_checkpoint(tempfile.mkdtemp()) is None
      True
    """
    checkpoint_dir = location(checkpoint_dir)
    directory = open_store(checkpoint_dir)
    state = get_checkpoint_state(checkpoint_dir, latest_filename)
    if state is None:
        # No state file (a kill before the first one was written) or an unreadable
        # one: the newest commit in the directory.
        commits = unrecorded_commits(directory, [])
        return join(directory.path, commits[-1][0]) if commits else None
    kept = [
        (split_prefix(p)[1], t)
        for p, t in zip(state.all_model_checkpoint_paths, state.all_model_checkpoint_timestamps)
    ]
    # Only the state file's own save path: another save path's commit (an export, a
    # `best` beside `model`) is not what this file was tracking.
    stem = stem_of(split_prefix(state.model_checkpoint_path)[1])
    missed = unrecorded_commits(directory, kept, stem)
    if missed:
        return join(directory.path, missed[-1][0])
    # Newest first; the index is the commit marker, so never name a prefix without it.
    candidates = [state.model_checkpoint_path, *reversed(state.all_model_checkpoint_paths)]
    for path in candidates:
        if is_committed(path):
            return path
    return None


def newest_of_save_path(
    checkpoint_dir: str, stem: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S
) -> str | None:
    """The newest committed checkpoint of save path `stem` in a directory (stem or stem-STEP).

    latest_checkpoint's answer when it names one of stem's; otherwise (the state
    file tracks another save path of the directory) the newest of stem's commits
    that were meant to be recorded.
    """
    latest = latest_checkpoint(checkpoint_dir)
    if latest is not None and names_of_save_path(stem).fullmatch(split_prefix(latest)[1]):
        return latest
    directory = open_store(location(checkpoint_dir), timeout_s)
    commits = unrecorded_commits(directory, [], stem)
    return join(directory.path, commits[-1][0]) if commits else None


def checkpoint_exists(checkpoint_prefix: str) -> bool:
    """Whether a committed checkpoint (its index) exists at the prefix, as tf.train.checkpoint_exists.

    Examples:
      >>> import shardsave, tempfile
      >>> shardsave.checkpoint_exists(tempfile.mkdtemp() + "/model-1")
      False
    """
    return is_committed(location(checkpoint_prefix))


def get_checkpoint_mtimes(checkpoint_prefixes: Iterable[str]) -> list[float]:
    """The modification times of the checkpoints that exist, as tf.train.get_checkpoint_mtimes.

    A checkpoint's time is its index's (the commit). Prefixes without a
    committed checkpoint are left out, so the list may be shorter.

    Examples:
      >>> import shardsave, tempfile
      >>> shardsave.get_checkpoint_mtimes([tempfile.mkdtemp() + "/model-1"])
      []
    """
    mtimes = []
    for prefix in checkpoint_prefixes:
        directory, base = split_prefix(location(prefix))
        if not base:
            continue
        mtime = open_store(directory).mtime(index_key(base))
        if mtime is not None:
            mtimes.append(mtime)
    return mtimes


def remove_checkpoint(checkpoint_prefix: str) -> None:
    """Deletes a checkpoint's files, index first, as tf.train.remove_checkpoint.

    It does not touch the state file: a state file naming it treats it as absent.

    Examples:
      >>> import numpy as np, shardsave, tempfile
      >>> p = shardsave.Saver(async_save=False).save({"a": np.ones(2)}, tempfile.mkdtemp() + "/m")
      >>> shardsave.remove_checkpoint(p); shardsave.checkpoint_exists(p)
      False
    """
    directory_name, base = split_prefix(location(checkpoint_prefix))
    if not base:
        raise ValueError(f"{checkpoint_prefix!r} names a directory, not a checkpoint prefix")
    directory = open_store(directory_name)
    directory.delete(index_key(base)).result()
    delete_checkpoint(directory, base, Listing.of(directory))


def delete_checkpoint(directory: Store, base: str, listing: Listing) -> None:
    """Deletes every data and temporary file of checkpoint base (its index is already gone)."""
    for future in [directory.delete(k) for k in listing.files_of(base)]:
        future.result()
