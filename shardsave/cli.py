"""The `shardsave` command: ls, inspect, verify, convert, demo.

Only convert writes, and only its destination.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from shardsave import __version__
from shardsave import tree as _tree
from shardsave.demo import load_config, run_demo
from shardsave.errors import CheckpointNotFoundError, ShardsaveError
from shardsave.export.safetensors import save_safetensors
from shardsave.formats import claimed
from shardsave.formats.safetensors import INDEX_NAME, SINGLE_NAME, is_safetensors
from shardsave.formats.safetensors import resolve as resolve_safetensors
from shardsave.formats.shardsave import INDEX_SUFFIX, Listing, step_of
from shardsave.lifecycle.state import STATE_FILENAME, latest_checkpoint
from shardsave.reader import CheckpointReader
from shardsave.saver import Saver
from shardsave.storage import open_store
from shardsave.storage.base import join, location

EXIT_BAD = 1  # a checkpoint is damaged


EXIT_USAGE = 2  # bad usage or a missing path


class _Usage(Exception):
    """Bad usage: printed as one line, exit status 2."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: list[list[str]], out: Any) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)


def cmd_ls(args: argparse.Namespace, out: Any) -> int:
    args.dir = location(args.dir)
    directory = open_store(args.dir)
    if directory.is_local and not os.path.isdir(directory.local_path("")):
        raise _Usage(f"{args.dir}: no such directory")
    listing = Listing.of(directory)
    bases = {base: listing.data.get(base, []) for base in listing.checkpoints()}
    if not bases and STATE_FILENAME not in listing.keys:
        raise _Usage(f"{args.dir} is not a checkpoint directory (no index, data or state file in it)")
    latest = latest_checkpoint(args.dir)
    latest_base = latest.rsplit("/", 1)[-1] if latest else None
    entries: list[tuple[float | None, int | None, str, str, str, str]] = []
    for base, data_keys in bases.items():
        step = step_of(base)
        if base in listing.committed:
            try:
                index = CheckpointReader(join(args.dir, base)).index
            except ShardsaveError as e:
                entries.append((None, step, "?", str(len(data_keys)), f"CORRUPT INDEX: {e}", base))
                continue
            state = "committed" + (" (latest)" if base == latest_base else "")
            entries.append(
                (index.created, index.global_step, _size(index.nbytes), str(len(index.files)), state, base)
            )
        else:
            local = [directory.local_path(k) for k in data_keys] if directory.is_local else []
            size = _size(sum(os.path.getsize(p) for p in local)) if local else "?"
            mtime = max((os.path.getmtime(p) for p in local), default=None)
            entries.append((mtime, step, size, str(len(data_keys)), "UNCOMMITTED (no index)", base))
    entries.sort(key=lambda e: (e[0] or 0.0, e[1] or 0), reverse=True)
    rows = [["CHECKPOINT", "STEP", "SAVED", "SIZE", "FILES", "STATE"]]
    rows += [
        [b, "-" if s is None else str(s), _when(t), size, n, state] for t, s, size, n, state, b in entries
    ]
    _table(rows, out)
    return 0


def _checkpoint_path(path: str) -> str:
    """A checkpoint prefix from what a user types: the prefix, its .index file, or a directory.

    Tab completion gives `model-1000.index`; a directory means its latest checkpoint.
    """
    path = location(path)
    if is_safetensors(path) or claimed(path):  # a checkpoint as it is (an Orbax directory, ...)
        return path
    if path.endswith(INDEX_SUFFIX):
        return path[: -len(INDEX_SUFFIX)]
    directory = open_store(path)  # if path is a directory (a prefix lists as empty)
    keys = directory.list()
    if INDEX_NAME in keys or SINGLE_NAME in keys:
        return resolve_safetensors(path)
    if (directory.is_local and os.path.isdir(directory.local_path(""))) or STATE_FILENAME in keys:
        latest = latest_checkpoint(path)
        if latest is None:
            raise _Usage(
                f"{path} is a directory with no committed checkpoint; `shardsave ls {path}` lists it"
            )
        return latest
    return path


_SOURCES = {
    "tensorflow": "a TensorFlow checkpoint: ",
    "dcp": "a PyTorch DCP checkpoint: ",
    "orbax": "an Orbax checkpoint: ",
}


_SOURCE_NAMES = {"dcp": "PyTorch DCP", "orbax": "Orbax", "tensorflow": "TensorFlow"}


def cmd_inspect(args: argparse.Namespace, out: Any) -> int:
    args.path = _checkpoint_path(args.path)
    reader = CheckpointReader(args.path)
    variables = reader.variables()
    total = sum(v.nbytes for v in variables)
    if args.json:
        doc = {
            "path": args.path,
            "source": reader.index.source,
            "global_step": reader.global_step,
            "format_version": reader.index.format_version,
            "created": reader.index.created,
            "files": len(reader.index.files),
            "total_bytes": total,
            "metrics": reader.metrics,
            "metadata": reader.metadata,
            "leaves": [
                {
                    "name": v.name,
                    "dtype": v.dtype_name,
                    "shape": list(v.shape),
                    "sharding": v.sharding,
                    "bytes": v.nbytes,
                    "shards": v.num_shards,
                }
                for v in variables
            ],
        }
        print(json.dumps(doc, indent=1), file=out)
        return 0
    rows = [["NAME", "DTYPE", "SHAPE", "SHARDING", "BYTES"]]
    rows += [[v.name, v.dtype_name, str(v.shape), v.sharding, _size(v.nbytes)] for v in variables]
    _table(rows, out)
    print(
        _SOURCES.get(reader.index.source, "")
        + f"{len(variables)} leaves, {_size(total)} in {len(reader.index.files)} data files, "
        f"step {reader.global_step}, saved {_when(reader.index.created)}",
        file=out,
    )
    for name, document in (("metrics", reader.metrics), ("metadata", reader.metadata)):
        if document is not None:
            print(f"{name}: {json.dumps(document, sort_keys=True)}", file=out)
    return 0


def cmd_verify(args: argparse.Namespace, out: Any) -> int:
    args.path = _checkpoint_path(args.path)
    reader = CheckpointReader(args.path)
    total = reader.index.nbytes
    bar = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify", leave=False)
        except ImportError:  # tqdm is in the "cli" extra
            bar = None
    problems = reader.verify(progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    if problems:
        for line in problems:
            print(f"BAD {line}", file=out)
        print(f"{len(problems)} bad shards in {args.path}", file=out)
        return EXIT_BAD
    shards = sum(len(leaf.shards) for leaf in reader.index.leaves)
    sound = (
        "lengths and crc32c sound"
        if reader.index.checksums.verified
        else f"lengths sound ({_SOURCE_NAMES.get(reader.index.source, reader.index.source)} "
        "checkpoints have no checksums of their data)"
    )
    print(f"OK {args.path}: {_size(total)} in {shards} shards, {sound}", file=out)
    return 0


def _progress(total: int, desc: str) -> Any:
    """A progress bar on a terminal (tqdm, the "cli" extra), else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


_LEFT_OUT = object()  # a leaf convert cannot store


def _pruned(node: Any) -> Any:
    """A tree rebuilt by decode_structure (dicts, lists, tuples, None) without _LEFT_OUT leaves."""
    if isinstance(node, dict):
        return {k: _pruned(v) for k, v in node.items() if v is not _LEFT_OUT}
    if isinstance(node, (list, tuple)):
        return type(node)(_pruned(v) for v in node if v is not _LEFT_OUT)
    return node


def cmd_convert(args: argparse.Namespace, out: Any) -> int:
    source = _checkpoint_path(args.src)
    reader = CheckpointReader(source)
    variables = reader.variables()
    to = args.to or ("safetensors" if reader.index.source == "shardsave" else "shardsave")
    total = sum(v.nbytes for v in variables if v.dtype != object)
    bar = _progress(total, f"convert to {to}")
    try:
        if to == "safetensors":
            written = save_safetensors(
                source, args.dst, max_shard_bytes=args.max_shard_bytes, progress=bar.update if bar else None
            )
            print(f"wrote to {args.dst}: {', '.join(os.path.basename(w) for w in written)}", file=out)
            left = [f"{v.name} ({v.dtype_name})" for v in variables if v.dtype == object]
            if left:
                print(f"left out, as no array can hold them: {', '.join(left)}", file=out)
            return 0
        # Tensors no array holds (TF strings, TF2's object graph) and Python strings
        # (Orbax's) cannot be a shardsave leaf.
        strings = {e.name for e in reader.index.leaves if e.kind == _tree.KIND_STR}
        left_out = {v.name for v in variables if v.dtype == object or v.name in strings}
        skipped = [f"{v.name} ({v.dtype_name})" for v in variables if v.name in left_out]
        values: list[Any] = []
        for v in variables:
            values.append(_LEFT_OUT if v.name in left_out else reader.get(v.name))
            if bar is not None and v.name not in left_out:
                bar.update(v.nbytes)
        # The source's own tree (safetensors' names nest along their "." parts, as
        # load_safetensors reads them), so the checkpoint restores into the same targets.
        tree = _pruned(_tree.decode_structure(reader.index.structure, values))
        saved = Saver(async_save=False).save(tree, args.dst, global_step=reader.global_step)
        print(f"wrote {saved} ({len(variables) - len(skipped)} leaves, {_size(total)})", file=out)
        if skipped:
            print(f"left out, as no array can hold them: {', '.join(skipped)}", file=out)
        return 0
    finally:
        if bar is not None:
            bar.close()


def cmd_demo(args: argparse.Namespace, out: Any) -> int:
    overrides = {
        k: v
        for k, v in {
            "steps": args.steps,
            "save_every": args.save_every,
            "preempt_at": args.preempt_at,
            "crash_at": args.crash_at,
            "directory": args.directory,
            "size": args.size,
        }.items()
        if v is not None
    }
    return run_demo(load_config(args.config, overrides), out)


_LOCATIONS = (
    "a local path, a file:// or memory:// URL, s3://bucket/path (AWS_ENDPOINT_URL and AWS_REGION "
    'honoured), gs://bucket/path, or a tensorstore kvstore spec as JSON (\'{"driver": "s3", '
    '"bucket": ..., "path": ..., "endpoint": ...}\')'
)


_CHECKPOINT = (
    f"a checkpoint prefix such as ckpt/model-1000 (or its .index file, or a directory for its latest "
    f"checkpoint); {_LOCATIONS}"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardsave",
        description="Look inside checkpoints (shardsave's, TensorFlow's, Orbax's, PyTorch DCP's, safetensors), and convert them.",
        epilog=f"exit status: 0 sound, {EXIT_BAD} a checkpoint is damaged, {EXIT_USAGE} bad usage or a missing path",
    )
    parser.add_argument("--version", action="version", version=f"shardsave {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="list the checkpoints in a directory, newest first")
    p.add_argument("dir", help=f"the checkpoint directory: {_LOCATIONS}")
    p.set_defaults(run=cmd_ls)
    p = sub.add_parser("inspect", help="the leaves of a checkpoint")
    p.add_argument("path", help=_CHECKPOINT)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_inspect)
    p = sub.add_parser(
        "verify",
        help="read every stored byte and check lengths and crc32c",
        epilog=f"exit status: 0 sound, {EXIT_BAD} damaged (one BAD line per shard), {EXIT_USAGE} bad usage",
    )
    p.add_argument("path", help=_CHECKPOINT)
    p.set_defaults(run=cmd_verify)
    p = sub.add_parser(
        "convert",
        help="TensorFlow, Orbax, PyTorch DCP or safetensors to a shardsave checkpoint, or to safetensors",
        description=(
            "Converts SRC into DST. A TensorFlow checkpoint, an Orbax or PyTorch DCP directory, or safetensors (a "
            ".safetensors file, an index.json, or a directory holding them) becomes a shardsave checkpoint at the prefix DST "
            "(its leaves named as SRC names them; the tensors are held in host memory while it is "
            "written); a shardsave checkpoint becomes safetensors in the directory DST, written a "
            "block at a time."
        ),
    )
    p.add_argument("src", help=f"{_CHECKPOINT}; or safetensors")
    p.add_argument("dst", help="a checkpoint prefix such as ckpt/model-1000, or a directory for safetensors")
    p.add_argument(
        "--to", choices=["shardsave", "safetensors"], help="the format of DST (default: the other one)"
    )
    p.add_argument(
        "--max-shard-bytes",
        type=int,
        default=5 << 30,
        help="safetensors: the most tensor bytes per file (default 5 GiB)",
    )
    p.set_defaults(run=cmd_convert)
    p = sub.add_parser("demo", help="train, get preempted, crash, resume onto other meshes, and report")
    p.add_argument(
        "--config",
        default=None,
        help="settings file (default: the packaged demo.yaml, also configs/demo.yaml)",
    )
    p.add_argument("--size", type=int, help="scale the model's width by this factor")
    p.add_argument("--steps", type=int, help="training steps in all")
    p.add_argument("--save-every", type=int, help="an asynchronous save every this many steps")
    p.add_argument("--preempt-at", type=int, help="send the training process SIGTERM after this step")
    p.add_argument("--crash-at", type=int, help="kill the resumed process with SIGKILL after this step")
    p.add_argument("--directory", help="where the demo creates its run-N folder (default: demo-out)")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    """Runs the command line; returns the exit status."""
    out = out or sys.stdout
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage line
        return int(e.code or 0) and EXIT_USAGE
    try:
        return int(args.run(args, out))
    except BrokenPipeError:  # `shardsave inspect ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (_Usage, CheckpointNotFoundError, FileNotFoundError) as e:
        print(f"shardsave: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ShardsaveError as e:
        first, *rest = str(e).splitlines()
        print(f"shardsave: error: {first}" + "".join(f"\n{line}" for line in rest), file=sys.stderr)
        return EXIT_BAD


if __name__ == "__main__":
    sys.exit(main())
