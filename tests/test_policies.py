"""Training-loop policies: when to save (should_save), preemption, what to keep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import shardsave

PROGRAMS = Path(__file__).parent / "programs"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_every_n_steps_from_step_0():
    saver = shardsave.Saver(save_interval_steps=3)
    assert [s for s in range(10) if saver.should_save(s)] == [0, 3, 6, 9]
    assert not shardsave.Saver().should_save(0)  # no policy: save when you like


def test_every_n_seconds_stays_due_until_a_save_is_made(tmp_path):
    clock = Clock()
    saver = shardsave.Saver(save_interval_secs=60, clock=clock, async_save=False)
    clock.t += 59
    assert not saver.should_save(1)
    clock.t += 1
    assert saver.should_save(2) and saver.should_save(3)  # due, and stays due
    saver.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=3)
    assert not saver.should_save(4)  # the interval starts over at the save
    clock.t += 60
    assert saver.should_save(5)


def test_a_failed_save_does_not_reset_the_interval(tmp_path):
    clock = Clock()
    saver = shardsave.Saver(save_interval_secs=10, clock=clock, async_save=False)
    clock.t += 11
    with pytest.raises(TypeError):
        saver.save({"a": object()}, str(tmp_path / "m"), global_step=1)
    assert saver.should_save(1)


def test_never_at_or_below_the_newest_step_saved_or_restored(tmp_path):
    saver = shardsave.Saver(save_interval_steps=5, async_save=False)
    path = saver.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=10)
    assert not saver.should_save(5) and not saver.should_save(10) and saver.should_save(15)
    resumed = shardsave.Saver(save_interval_steps=5)
    resumed.restore(path)
    assert not resumed.should_save(10) and resumed.should_save(15)


def test_steps_and_seconds_together_with_retention(tmp_path):
    clock = Clock()
    saver = shardsave.Saver(
        save_interval_steps=100, save_interval_secs=30, max_to_keep=2, clock=clock, async_save=False
    )
    saved = []
    for step in range(1, 301):
        clock.t += 1  # a step a second: the time rule fires at 30 s, 60 s, ...
        if saver.should_save(step):
            saver.save({"a": np.full(1, step)}, str(tmp_path / "m"), global_step=step)
            saved.append(step)
    assert saved[:4] == [30, 60, 90, 100] and 300 in saved
    assert len(saver.last_checkpoints) == 2


def test_processes_with_different_clocks_agree(tmp_path):
    from test_multiprocess import _ok, run_processes

    outs = _ok(run_processes(2, 2, "should_save", tmp_path, timeout=180))
    answers = [json.loads(out.strip().splitlines()[-1])["due"] for out in outs]
    assert answers[0] == answers[1] and any(answers[0]) and not all(answers[0])


def _committed(directory) -> list[int]:
    return sorted(int(p.name[: -len(".index")].rsplit("-", 1)[1]) for p in directory.glob("*.index"))


def test_keep_period_keeps_every_kth_step_beside_the_most_recent(tmp_path):
    saver = shardsave.Saver(max_to_keep=2, keep_period=4, async_save=False)
    for step in range(1, 11):
        saver.save({"a": np.full(1, step)}, str(tmp_path / "m"), global_step=step)
    assert _committed(tmp_path) == [4, 8, 9, 10]
    assert [p.rsplit("-", 1)[1] for p in saver.last_checkpoints] == ["9", "10"]


def test_keep_period_with_hours_and_a_restart(tmp_path):
    clock = Clock(0.0)
    saver = shardsave.Saver(
        max_to_keep=1, keep_period=5, keep_checkpoint_every_n_hours=1.0, clock=clock, async_save=False
    )
    for step in range(1, 8):
        clock.t += 25 * 60
        saver.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=step)
    saver.close()
    # 5 by the period; 3 (75 min) and 6 (150 min, an hour after 3) by the hour rule; 7, the newest.
    assert _committed(tmp_path) == [3, 5, 6, 7]
    restarted = shardsave.Saver(max_to_keep=1, keep_period=5, clock=clock, async_save=False)
    for step in range(8, 12):
        clock.t += 60
        restarted.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=step)
    # The restarted Saver adopts 7 and deletes it in turn; 10 is kept by the period.
    assert _committed(tmp_path) == [3, 5, 6, 10, 11]


def _best_run(tmp_path, losses, **options):
    saver = shardsave.Saver(async_save=True, **options)
    for step, loss in enumerate(losses, start=1):
        metrics = None if loss == "missing" else {"loss": loss}
        saver.save({"a": np.full(1, step)}, str(tmp_path / "m"), global_step=step, metrics=metrics)
    saver.wait_until_finished()  # returns after the deletions a save triggered
    return saver, _committed(tmp_path)


def test_keep_best_keeps_exactly_the_n_best_and_the_newest(tmp_path):
    _, kept = _best_run(tmp_path, [0.9, 0.5, 0.7, 0.4, 0.8, 0.6], keep_best=2)
    assert kept == [2, 4, 6]  # the two lowest losses, and the newest (step 6)


def test_keep_best_ties_missing_and_nan(tmp_path):
    _, kept = _best_run(tmp_path, [0.5, 0.5, "missing", 0.2, 0.9], keep_best=2, best_metric="loss")
    assert kept == [2, 4, 5]  # tie at 0.5: the newer (2) wins; a missing metric is never best
    nan_dir = tmp_path / "nan"
    nan_dir.mkdir()
    saver = shardsave.Saver(keep_best=1, async_save=False)
    saver.save({"a": np.ones(1)}, str(nan_dir / "m"), global_step=1, metrics={"loss": 0.3})
    with pytest.raises(TypeError, match="nan"):  # JSON cannot hold NaN: refused, nothing written
        saver.save({"a": np.ones(1)}, str(nan_dir / "m"), global_step=2, metrics={"loss": float("nan")})
    saver.save({"a": np.ones(1)}, str(nan_dir / "m"), global_step=3, metrics={"loss": None})
    assert _committed(nan_dir) == [1, 3]


def test_keep_best_with_mode_max_and_after_a_restart(tmp_path):
    saver, kept = _best_run(tmp_path, [0.1, 0.9, 0.3], keep_best=1, best_metric="loss", best_mode="max")
    assert kept == [2, 3]
    saver.close()
    restarted = shardsave.Saver(keep_best=1, best_mode="max", async_save=False)  # metrics read back
    restarted.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=4, metrics={"loss": 0.5})
    assert _committed(tmp_path) == [2, 4]
    restarted.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=5, metrics={"loss": 0.95})
    assert _committed(tmp_path) == [5]


def test_keep_best_with_keep_period(tmp_path):
    _, kept = _best_run(tmp_path, [0.9, 0.8, 0.7, 0.1, 0.6, 0.5], keep_best=1, keep_period=3)
    assert kept == [3, 4, 6]  # 4 is best, 6 the newest, 3 kept by the period


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def _wait_for(path, proc, predicate, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not any(predicate(r) for r in _lines(path)):
        assert proc.poll() is None, f"the program ended before {what}: {proc.returncode}"
        # A guard against a hung program, not a speed check: the step takes milliseconds.
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.02)


def test_a_sigterm_makes_the_loop_save_and_exit_and_a_second_one_does_not_interrupt(tmp_path):
    """Real SIGTERMs to a training process: the first is the notice, the second lands mid-save."""
    out = tmp_path / "out"
    with open(out, "w") as stdout, open(tmp_path / "err", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(PROGRAMS / "preempted_alone.py"), str(tmp_path / "ckpt")],
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
    try:
        _wait_for(out, proc, lambda r: r.get("step", 0) >= 60, "step 60")  # a periodic save at 50 is made
        proc.send_signal(signal.SIGTERM)
        _wait_for(out, proc, lambda r: "saving" in r, "final save")
        proc.send_signal(signal.SIGTERM)  # while that save runs
        assert proc.wait(timeout=60) == 0, (tmp_path / "err").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = _lines(out)
    result = next(r for r in records if "saved" in r)
    step = result["saved"]
    # Saved at the step after the one at which the notice arrived, and no further.
    assert max(r["step"] for r in records if "step" in r) == step
    assert step > 60
    assert result["notices"] == 2 and result["own_calls"] == 2  # both recorded, the program's handler chained
    assert records[-1] == {"handler_restored": True}  # close() put the program's handler back
    ckpt = str(tmp_path / "ckpt")
    assert shardsave.latest_checkpoint(ckpt) == f"{ckpt}/model-{step}"
    assert _committed(tmp_path / "ckpt") == [50, step]
    restored = shardsave.Saver().restore(f"{ckpt}/model-{step}", {"w": np.zeros((64, 64), np.float32)})
    assert (restored["w"] == step).all()


def test_reached_preemption_without_the_option_is_false_and_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    saver = shardsave.Saver()
    assert not saver.reached_preemption(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_save_on_preemption_off_the_main_thread_is_refused_with_the_reason():
    errors: list[BaseException] = []

    def create() -> None:
        try:
            shardsave.Saver(save_on_preemption=True)
        except ValueError as e:
            errors.append(e)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


def test_in_process_notice_is_agreed_at_the_next_step_and_stays(tmp_path):
    """One process: the step after the notice is the one; later steps stay True."""
    before = signal.getsignal(signal.SIGTERM)
    saver = shardsave.Saver(save_on_preemption=True, save_interval_steps=1000)
    try:
        assert signal.getsignal(signal.SIGTERM) is not before
        assert not any(saver.reached_preemption(s) for s in range(1, 5))
        notices = saver.preemption_notices
        os.kill(os.getpid(), signal.SIGTERM)
        assert saver.preemption_notices == notices + 1
        # Noticed at step 7 (between the loop's two questions): step 8 is the one.
        assert not saver.reached_preemption(7) and not saver.should_save(7)
        assert saver.should_save(8) and saver.reached_preemption(8)
        assert saver.reached_preemption(9) and not saver.reached_preemption(7)
        saver.save({"x": np.ones(2)}, str(tmp_path / "model"), global_step=8)
        assert not saver.should_save(8)  # saved: never at or below the newest step
    finally:
        saver.close()
    assert signal.getsignal(signal.SIGTERM) is before
