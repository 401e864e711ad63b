"""Training arguments: one dataclass, mapped one to one onto the ``dflare train`` flags, and the error
that names a flag which cannot work."""

import dataclasses
from pathlib import Path


#: The block size of a fresh draft when ``--block-size`` is not given (a warm start keeps its parent's).
DEFAULT_BLOCK_SIZE = 16


class TrainingInputError(ValueError):
    """A training argument that cannot work, found before any model is loaded."""


@dataclasses.dataclass
class TrainArgs:
    """Everything a training run needs; the CLI flags map one to one onto these fields.

    ``num_anchors=None`` draws about ``response length / block_size`` anchors per sequence, so the
    blocks cover the response once on average (NVIDIA ModelOpt's choice); an integer fixes the count.
    ``epochs`` passes over the training sequences; with ``hidden_cache`` the target runs only on the
    first (and :func:`~modeling_dflare.training.features.TargetFeatures.fill` can run it up front).
    ``features_only`` stops after that fill: the cache is written for a later run, nothing is trained.
    """

    output_dir: str
    target: str | None = None
    data: str | None = None
    heldout: str | None = None
    work_dir: str | None = None
    num_hidden_layers: int = 2
    fusion: str = "layerwise"
    num_target_layers: int | None = None
    #: None: the --init-from draft's block size, else :data:`DEFAULT_BLOCK_SIZE`
    block_size: int | None = None
    num_anchors: int | None = None
    max_length: int = 512
    epochs: float = 6.0
    max_steps: int | None = None
    batch_size: int = 4
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    gamma: float | None = None
    draft_vocab_size: int | None = 8192
    draft_vocab_data: str | None = None
    precision: str = "auto"
    target_precision: str = "auto"
    hidden_cache: str | None = None
    cache_storage: str = "auto"
    save_every: int = 100
    eval_every: int = 200
    max_train_sequences: int | None = None
    labels: str = "target"
    init_layers: str = "target"
    init_from: str | None = None
    grow_layers: int = 0
    seed: int = 0
    #: None: the --init-from draft's cut, else 0.0 (no cut)
    confidence_threshold: float | None = None
    threads: int | None = None
    consistency_prompts: int = 8
    tune_threshold: bool = False
    features_only: bool = False
    distill: float = 0.0
    chat_template: str | None = None
    no_chat_template: bool = False
    base_model: str | None = None
    license: str | None = None
    dataset: list[str] | None = None

    @property
    def storage(self) -> str:
        """The hidden-cache storage for new files: ``cache_storage``, with "auto" resolved."""
        if self.cache_storage == "auto":
            return "bf16" if self.distill > 0 else "fp8"
        return self.cache_storage

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output_dir).with_name(Path(self.output_dir).name + "-work")


def add_arguments(parser) -> None:
    """The ``dflare train`` flags."""
    defaults = TrainArgs(output_dir="")
    parser.add_argument(
        "--output-dir", required=True,
        help="final Hub-ready draft folder: a new or empty folder, or a draft an earlier dflare train wrote (replaced at the end)",
    )
    parser.add_argument("--target", default=None, help="target folder or .gguf file (default: embedded SmolLM2)")
    parser.add_argument(
        "--data",
        default=None,
        help="comma-separated sources: a regenerated-answers folder, sharegpt, .json or .jsonl (default: sharegpt)",
    )
    parser.add_argument("--heldout", default=None, help="held-out data (default: a hash split of --data)")
    parser.add_argument("--work-dir", default=None, help="checkpoints, logs and caches (default: OUTPUT_DIR-work)")
    for name in ("num_hidden_layers", "max_length", "batch_size", "save_every", "eval_every", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument(
        "--block-size", type=int, default=None,
        help=f"positions per draft block (default: the --init-from draft's, else {DEFAULT_BLOCK_SIZE})",
    )
    parser.add_argument(
        "--num-anchors", type=int, default=None, help="anchor blocks per sequence (default: response length / block size)"
    )
    for name in ("epochs", "lr", "warmup_ratio", "weight_decay"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument(
        "--confidence-threshold", type=float, default=None,
        help="the confidence cut saved in the draft's config (default: the --init-from draft's, else 0 = no cut)",
    )
    parser.add_argument("--fusion", choices=("layerwise", "shared"), default=defaults.fusion)
    parser.add_argument("--num-target-layers", type=int, default=None, help="default 9 (layerwise) or 5 (shared)")
    parser.add_argument("--gamma", type=float, default=None, help="loss decay (default 7 for block 16, scaled by block size)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--max-train-sequences", type=int, default=None)
    parser.add_argument("--draft-vocab-size", type=int, default=defaults.draft_vocab_size, help="0 = full vocabulary")
    parser.add_argument(
        "--draft-vocab-data",
        default=None,
        metavar="SOURCES",
        help="choose the draft vocabulary from the answers of these comma-separated sources (tokenised only, no "
        "target pass), each prompt source (chat, gsm-symbolic, codeio, pystubs, pylibs) weighed equally; with --init-from it replaces "
        "the parent's vocabulary, which is otherwise kept",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "no", "bf16", "fp16"),
        default="auto",
        help="draft training precision (auto: bf16 autocast on GPU and on CPUs with native bf16, else fp32)",
    )
    parser.add_argument(
        "--target-precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="target feature pass (auto: bf16 where the hardware has it natively)",
    )
    parser.add_argument("--hidden-cache", default=None, help="cache target hidden states in this folder (reused by later epochs and runs)")
    parser.add_argument(
        "--cache-storage",
        choices=("auto", "bf16", "fp8"),
        default=defaults.cache_storage,
        help="how new --hidden-cache files store hidden states: fp8 with a scale per token and layer (half of bf16's "
        "disk; held-out acceptance unchanged) or bf16; auto: fp8, but bf16 with --distill, whose teacher rebuilds "
        "the target's logits from the deepest cached layer (greedy agreement about 0.98 from fp8, 0.995 from bf16). "
        "`dflare cache` converts an existing cache",
    )
    parser.add_argument("--init-from", default=None, help="warm-start from a draft folder: its block size, cut and prompt-lookup settings are kept unless "
                        "--block-size / --confidence-threshold say otherwise")
    parser.add_argument(
        "--grow-layers",
        type=int,
        default=0,
        help="with --init-from: add this many layers on top, starting as identities (the draft's output is unchanged at step 0)",
    )
    parser.add_argument(
        "--init-layers",
        choices=("target", "random"),
        default="target",
        help="target: start each draft layer as the target layer at the same relative depth (default); random",
    )
    parser.add_argument(
        "--labels",
        choices=("target", "data"),
        default="target",
        help="target: the target's greedy predictions on on-policy positions (default); data: the data tokens",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 per process when two runs share 2 cores)")
    parser.add_argument(
        "--consistency-prompts",
        type=int,
        default=defaults.consistency_prompts,
        help="held-out prompts for the implied-vs-measured acceptance check after training (0 = skip)",
    )
    parser.add_argument(
        "--tune-threshold",
        action="store_true",
        help="after training, set the confidence cut that a cost model (this machine's measured target and draft "
        "forward times, the held-out answers' acceptance) predicts fastest",
    )
    parser.add_argument(
        "--distill",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="weight of the target's distribution in the loss: (1 - ALPHA) x CE on its greedy token + ALPHA x CE on "
        "its softmax over the draft vocabulary, rebuilt from the cached features (0 = greedy labels only)",
    )
    parser.add_argument(
        "--features-only",
        action="store_true",
        help="with --hidden-cache: compute and cache the target features of --data and --heldout, then stop "
        "(no training, no output folder; interrupt and rerun at will, finished sequences are kept)",
    )
    # the same two flags as every command that applies a chat template (modeling_dflare.chat_templates)
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--chat-template", default=None, metavar="FILE",
                         help="Jinja chat template (as transformers takes it) for a target without one, or replacing its own")
    prompts.add_argument("--no-chat-template", action="store_true",
                         help="plain completion prompts for a base model: each turn's text, then a blank line, no role markers")
    card = parser.add_argument_group("model card (recorded in training_summary.json; default: the target's metadata and the data cards)")
    card.add_argument("--base-model", default=None, metavar="ORG/NAME", help="the Hub id of the target the draft is for")
    card.add_argument("--license", default=None, metavar="ID", help="the base model's licence (e.g. apache-2.0, gemma, llama3.2)")
    card.add_argument("--dataset", action="append", default=None, metavar="ORG/NAME",
                      help="a Hub dataset the training prompts come from (repeatable; replaces what the data cards say)")

