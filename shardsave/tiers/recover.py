"""Restoring from the fastest tier that holds a complete step.

On restart the processes exchange (through jax's key-value store) which local
steps they hold and which data files of each, and process 0 says which step the
persistent tier's newest checkpoint has. Every process then makes the same
choice (`choose`, pure): the newest local step newer than that persistent step
whose data files are all held by some running process. Before restoring it,
each process names the data files its own target needs (its restore plan), and
those it lacks come from a process that holds them, through jax's collectives
(tiers.transfer): a replaced host's own files from its peer's replica, a
replicated leaf's file from the process that wrote it. A process without the
step's index gets it through the key-value store. Then each restores from its
own local directory as from any checkpoint, every byte verified.

If a process's restore fails (a damaged local file), every process checks what
it holds of that step, drops what is damaged, and the choice is made again
once; after that, or when no local step qualifies, the restore reads the
persistent tier. The choice and its reason are reported (Saver.last_restore).
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardsave.errors import CorruptCheckpointError, ShardsaveError, StorageError
from shardsave.formats.shardsave import decode_index, index_key
from shardsave.index import Index
from shardsave.restore.fetch import Fetcher
from shardsave.restore.plan import LeafRequest, plan_restore, read_span
from shardsave.save.coordination import Coordinator, shared_key
from shardsave.storage import aligned_empty
from shardsave.tiers.local import Held, LocalTier
from shardsave.tiers.transfer import Move, move_files

LOCAL, PERSISTENT = "local", "persistent"


@dataclass(frozen=True)
class Choice:
    """Which tier a restore reads, the step, and why."""

    tier: str  # LOCAL or PERSISTENT
    step: int | None
    reason: str
    path: str | None = None  # the persistent checkpoint, where the persistent tier is read
    base: str | None = None  # the local checkpoint's name, where the local tier is read


def choose(reports: dict[int, dict[str, Any]], persistent: list[Any] | None) -> Choice:
    """The newest step recoverable from the local tiers, if newer than the persistent one.

    Args:
      reports: each running process's local holdings: {"steps": {STEP: {"base":
        name, "files": [data files held], "owners": [each data file's writer]}}}.
      persistent: [path, step] of the persistent tier's newest checkpoint, or None.
    """
    path, newest = (persistent[0], persistent[1]) if persistent else (None, None)
    steps = sorted({int(s) for r in reports.values() for s in r["steps"]}, reverse=True)
    why: list[str] = []
    for step in steps:
        if newest is not None and step <= newest:
            break
        held = {p: r["steps"][str(step)] for p, r in reports.items() if str(step) in r["steps"]}
        some = next(iter(held.values()))
        owners = some["owners"]
        holders = {k: [p for p, h in held.items() if k in h["files"]] for k in range(len(owners))}
        missing = [k for k, ps in holders.items() if not ps]
        if not missing:
            copies = sum(len(ps) for ps in holders.values())
            return Choice(
                LOCAL,
                step,
                f"local step {step} is newer than "
                + (
                    f"the persistent tier's newest (step {newest})"
                    if newest is not None
                    else "anything persistent"
                )
                + f"; the {len(reports)} processes' local tiers hold all its {len(owners)} data files "
                f"({copies} copies)",
                base=some["base"],
            )
        lost = sorted({owners[k] for k in missing})
        why.append(
            f"local step {step} lacks the data files of process(es) {lost} (no running process holds them)"
        )
    if not steps:
        why.append("no local tier holds a committed step")
    elif newest is not None and steps[0] <= newest:
        why.append(f"no local step is newer than the persistent tier's step {newest}")
    if path is None:
        return Choice(PERSISTENT, None, "; ".join([*why, "and the persistent tier holds no checkpoint"]))
    return Choice(PERSISTENT, newest, "; ".join([*why, f"restoring {path}"]), path=path)


def needed_spans(index: Index, requests: list[LeafRequest]) -> dict[int, list[tuple[int, int]]]:
    """The byte ranges of each data file that a restore of these requests reads (its plan, no I/O).

    Each read widened to the checksum chunks that verify it, as the restore reads
    it; ranges that touch or overlap are merged (a restore may coalesce them).
    """
    plan = plan_restore(requests, index.checksums, budget=None, sequential=False)
    spans: dict[int, list[tuple[int, int]]] = {}
    for unit in plan.units:
        for read in unit.reads:
            a, b = read_span(read, index.checksums)
            spans.setdefault(read.shard.file, []).append((read.shard.offset + a, read.shard.offset + b))
    return {k: _merged(v) for k, v in spans.items()}


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def plan_moves(held: dict[int, set[int]], needs: dict[int, dict[int, list[tuple[int, int]]]]) -> list[Move]:
    """Each range a process needs of a file it lacks, from the holder that sends the fewest bytes."""
    load: Counter[int] = Counter()
    moves = []
    for p in sorted(needs):
        for k, spans in sorted(needs[p].items()):
            if k in held.get(p, set()):
                continue
            holders = [q for q in sorted(held) if k in held[q]]
            for a, b in spans:
                source = min(holders, key=lambda q: (load[q], q))
                load[source] += b - a
                moves.append(Move(k, a, b, source, p))
    return moves


def damaged_files(tier: LocalTier, held: Held) -> frozenset[int]:
    """The data files of a local checkpoint whose bytes disagree with its index (all read)."""
    names = {id(shard): leaf.name for leaf in held.index.leaves for shard in leaf.shards}
    fetcher = Fetcher(tier.store, held.base, held.index, names, aligned_empty)
    bad = set()
    for leaf in held.index.leaves:
        for shard in leaf.shards:
            if shard.file in held.files and shard.file not in bad:
                try:
                    fetcher.verify_shard(shard)
                except (CorruptCheckpointError, StorageError, OSError):
                    bad.add(shard.file)
    return frozenset(bad)


def _restore_view(
    tier: LocalTier,
    base: str,
    index: Index,
    raw: bytes | None,
    held: Held | None,
    moves: list[Move],
    restore: Callable[[str], Any],
    pid: int,
) -> tuple[Any, str]:
    """Receives the ranges this process lacks into a view of the step, and restores it.

    Returns the restored value, or an error's description (naming the local
    directory's files, not the view's).
    """

    def read_into(k: int, start: int, out: np.ndarray) -> None:
        assert held is not None  # only a holder sends
        tier.read_into(held, k, start, out)

    view = None
    try:
        if raw is None:
            raw = tier.store.read_all(index_key(base)) or b""
        view = tier.view(base, index, raw, held.files if held is not None else frozenset(), pid)
    except OSError as e:
        failed: BaseException | None = e
    else:
        failed = None
    # Every process takes part in every round it is in, whatever failed here: a peer
    # waiting in a collective has no deadline. A failure is reported after them.
    moved = move_files(moves, read_into, view.write if view is not None else _discard)
    try:
        if failed is not None:
            raise failed
        if moved is not None:
            raise moved
        assert view is not None
        return restore(view.prefix), ""
    except (ShardsaveError, OSError) as e:
        text = f"{type(e).__name__}: {e}"
        return None, text if view is None else text.replace(view.path, tier.root)
    finally:
        if view is not None:
            view.close()


def _discard(k: int, start: int, data: memoryview) -> None:
    """Where received bytes go when this process could not make its view (it reports that)."""


def restore_from_tiers(
    tier: LocalTier,
    stem: str,
    subject: str,
    coordinator: Coordinator,
    persistent: Callable[[], tuple[str, int | None] | None],
    requests_of: Callable[[Index, str], list[LeafRequest]],
    restore: Callable[[str], Any],
) -> tuple[Any, Choice]:
    """Restores the newest step from the fastest tier that holds it whole (collective).

    Args:
      tier: this process's local tier.
      stem: the save path's name: local checkpoints are stem-STEP.
      subject: what every process shares about this restore (the save path), for its keys.
      persistent: process 0's view of the persistent tier: (path, step) of its newest checkpoint.
      requests_of: the target's leaf requests on a checkpoint's index at a path.
      restore: restores the checkpoint at a path (the Saver's restore).

    Returns:
      What restore returned (None where no tier holds a checkpoint it can
      restore), and the choice.

    Raises:
      CorruptCheckpointError: a local step failed to restore (and the choice made
        again found nothing else local), and the persistent tier holds nothing to
        fall back on.
    """
    what = f"restoring {subject} from its tiers"
    pid = coordinator.process_index
    dropped: list[str] = []
    for attempt in range(2):
        key = shared_key("tiers", subject)
        held = tier.held(stem)
        mine: dict[str, Any] = {
            "steps": {
                str(step): {
                    "base": h.base,
                    "files": sorted(h.files),
                    "owners": [f.process_index for f in h.index.files],
                }
                for step, h in held.items()
            }
        }
        if pid == 0:
            newest = persistent()
            mine["persistent"] = None if newest is None else list(newest)
        reports = {
            p: json.loads(v) for p, v in coordinator.exchange(f"{key}/held", json.dumps(mine), what).items()
        }
        choice = choose(reports, reports[0].get("persistent"))
        if dropped:
            choice = Choice(
                choice.tier, choice.step, "; ".join([*dropped, choice.reason]), choice.path, choice.base
            )
        if choice.tier == PERSISTENT:
            break
        assert choice.step is not None and choice.base is not None
        step, base = choice.step, choice.base
        mine_held = held.get(step)
        index: Index | None = None if mine_held is None else mine_held.index
        raw: bytes | None = None
        lacking = [p for p, r in reports.items() if str(step) not in r["steps"]]
        if lacking:
            sender = min(p for p, r in reports.items() if str(step) in r["steps"])
            if pid == sender:
                data = tier.store.read_all(index_key(base)) or b""
                coordinator.publish(f"{key}/index", base64.b64encode(data).decode())
            if mine_held is None:
                raw = base64.b64decode(coordinator.fetch(f"{key}/index", what))
                index = decode_index(raw, tier.prefix(base) + ".index")
        assert index is not None
        needs = needed_spans(index, requests_of(index, tier.prefix(base)))
        mine_needs = json.dumps({str(k): v for k, v in needs.items()})
        all_needs = {
            p: {int(k): [(a, b) for a, b in v] for k, v in json.loads(raw_needs).items()}
            for p, raw_needs in coordinator.exchange(f"{key}/needs", mine_needs, what).items()
        }
        holdings = {
            p: set(r["steps"][str(step)]["files"]) for p, r in reports.items() if str(step) in r["steps"]
        }
        moves = plan_moves(holdings, all_needs)
        value, error = _restore_view(tier, base, index, raw, mine_held, moves, restore, pid)
        outcomes = coordinator.exchange(f"{key}/outcome", error, what)
        failed = {p: o for p, o in outcomes.items() if o}
        if not failed:
            if mine_held is None and raw:  # so that CheckpointReader of the step's local prefix reads it
                with contextlib.suppress(OSError):  # the restore is done: a copy of the index is a courtesy
                    tier.store.write(index_key(base), raw).result()
            return value, choice
        dropped.append(
            f"local step {step} failed to restore on process(es) {sorted(failed)} ({next(iter(failed.values()))})"
        )
        if attempt == 0:
            # A damaged local file: every process drops what it holds of the step that is
            # damaged, and the choice is made again (a replica may hold the file whole).
            now = tier.held(stem).get(step)
            if now is not None:
                bad = damaged_files(tier, now)
                if bad:
                    tier.forget(now.base, bad)
            continue
        choice = Choice(PERSISTENT, None, "; ".join(dropped))
        newest = reports[0].get("persistent")
        if newest:
            choice = Choice(PERSISTENT, newest[1], f"{choice.reason}; restoring {newest[0]}", path=newest[0])
        break
    if choice.path is None:
        if dropped:  # a local step was there but would not restore: never a silent fresh start
            raise CorruptCheckpointError(f"{what}: {choice.reason}")
        return None, choice
    return restore(choice.path), choice
