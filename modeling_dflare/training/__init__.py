"""Train a DFlare (or DFlash) draft for any decoder-only target.

One command, one loop (``accelerate`` underneath, so ``accelerate launch`` runs it on several
processes unchanged). One file per concern, each readable on its own:

* :mod:`.args` -- :class:`TrainArgs` and the ``dflare train`` flags;
* :mod:`.sequences` -- conversations (regenerated answers first) to chat-templated sequences;
* :mod:`.features` -- the frozen target's hidden states and greedy choices, cached on disk and
  read back by every later epoch and run;
* :mod:`.loss` -- all anchor blocks of a sequence in one draft pass, position-weighted CE, and the
  per-position accuracy that implies an acceptance length;
* :mod:`.draft_init` -- a fresh draft shaped for the target, or a warm start;
* :mod:`.loop` -- optimizer steps, checkpoints, the Hub-ready output folder;
* :mod:`.evaluate` -- held-out accuracy and acceptance (also ``dflare evaluate``);
* :mod:`.card` -- the trained draft's model card;
* :mod:`.checkpoints` -- SIGKILL- and full-disk-safe checkpoints;
* :mod:`.consistency` -- implied vs measured acceptance on the same held-out prompts.
"""

from .args import TrainArgs, TrainingInputError, add_arguments
from .checkpoints import latest_checkpoint, save_checkpoint
from .draft_init import build_draft, copy_target_layers
from .features import Features, TargetFeatures
from .loop import run, train
from .loss import AccuracyMeter, BlockResult, block_loss, target_labels
from .sequences import (
    Sequence, TrainingData, choose_draft_vocab, first_exchange, load_training_conversations, tokenize_conversations,
    tokenize_training_data,
)

__all__ = [
    "AccuracyMeter",
    "BlockResult",
    "Features",
    "Sequence",
    "TargetFeatures",
    "TrainArgs",
    "TrainingData",
    "TrainingInputError",
    "add_arguments",
    "block_loss",
    "build_draft",
    "choose_draft_vocab",
    "copy_target_layers",
    "first_exchange",
    "latest_checkpoint",
    "load_training_conversations",
    "run",
    "save_checkpoint",
    "target_labels",
    "tokenize_conversations",
    "tokenize_training_data",
    "train",
]
