"""Writes the `checkpoint` state files in this folder with TensorFlow itself.

Run once, in an environment with tensorflow-cpu (not a test dependency):

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu
    /tmp/tf/bin/python tests/golden/tf/make_state_files.py

`checkpoint` comes from tf.train.CheckpointManager (all four fields, relative
paths); `checkpoint-escaped` from the same with a checkpoint name that needs
escaping (a quote, a backslash, a non-ASCII letter); `checkpoint-tf1` from
tf.compat.v1.train.Saver (no timestamps). Only the state files are kept.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import tensorflow as tf

HERE = Path(__file__).parent


def manager_state(name: str, target: str) -> None:
    directory = tempfile.mkdtemp()
    checkpoint = tf.train.Checkpoint(v=tf.Variable(1.0))
    clock = mock.patch("time.time")
    with clock as now:
        now.return_value = 10000.0
        manager = tf.train.CheckpointManager(
            checkpoint, directory, max_to_keep=2, keep_checkpoint_every_n_hours=1.0, checkpoint_name=name
        )
        for t in (10000.0, 13610.0, 14330.0, 17940.0):
            now.return_value = t
            manager.save()
    shutil.copy(os.path.join(directory, "checkpoint"), HERE / target)
    shutil.rmtree(directory)


def saver_state(target: str) -> None:
    directory = tempfile.mkdtemp()
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        v = tf.compat.v1.Variable(1.0, name="v")
        session.run(tf.compat.v1.global_variables_initializer())
        saver = tf.compat.v1.train.Saver({"v": v}, max_to_keep=2)
        for step in (1, 2, 3):
            saver.save(session, os.path.join(directory, "model.ckpt"), global_step=step)
    shutil.copy(os.path.join(directory, "checkpoint"), HERE / target)
    shutil.rmtree(directory)


if __name__ == "__main__":
    manager_state("ckpt", "checkpoint")
    manager_state('we"ird\\ name ü', "checkpoint-escaped")
    saver_state("checkpoint-tf1")
    print(tf.__version__)
