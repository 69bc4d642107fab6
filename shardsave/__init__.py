"""shardsave: fast, safe checkpoints of sharded JAX training state.

tf.train.Saver's contract (global_step naming, the `checkpoint` state file,
latest_checkpoint, max_to_keep, keep_checkpoint_every_n_hours, sharded=True,
restore_sequentially, reshape), made JAX-native: one data file per device,
written off the training thread (tensorstore for object stores), an index
written last as the commit marker, and restores onto any mesh or device count.
TensorFlow checkpoints and Hugging Face safetensors restore the same way
(Saver.restore, load_safetensors); save_safetensors writes the latter.
"""

from shardsave import errors as errors
from shardsave.export.safetensors import load_safetensors as load_safetensors
from shardsave.export.safetensors import save_safetensors as save_safetensors
from shardsave.formats.shardsave import FORMAT_VERSION as FORMAT_VERSION
from shardsave.lifecycle.state import CheckpointState as CheckpointState
from shardsave.lifecycle.state import checkpoint_exists as checkpoint_exists
from shardsave.lifecycle.state import get_checkpoint_mtimes as get_checkpoint_mtimes
from shardsave.lifecycle.state import get_checkpoint_state as get_checkpoint_state
from shardsave.lifecycle.state import latest_checkpoint as latest_checkpoint
from shardsave.lifecycle.state import remove_checkpoint as remove_checkpoint
from shardsave.reader import CheckpointReader as CheckpointReader
from shardsave.reader import VariableInfo as VariableInfo
from shardsave.reader import load_structure as load_structure
from shardsave.saver import RestoreInfo as RestoreInfo
from shardsave.saver import SaveInfo as SaveInfo
from shardsave.saver import Saver as Saver

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "CheckpointReader",
    "CheckpointState",
    "RestoreInfo",
    "SaveInfo",
    "Saver",
    "VariableInfo",
    "checkpoint_exists",
    "errors",
    "get_checkpoint_mtimes",
    "get_checkpoint_state",
    "latest_checkpoint",
    "load_safetensors",
    "load_structure",
    "remove_checkpoint",
    "save_safetensors",
]
