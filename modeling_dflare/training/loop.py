"""The training loop: optimizer steps over the cached target features, held-out evaluation,
checkpoints, and the Hub-ready output folder with its summary and model card.

``accelerate`` runs underneath, so ``accelerate launch`` spreads the same loop over several
processes. The data stream is a deterministic function of the step (epoch-wise permutations of
the sequences, per-step anchor seeds), which is what makes a resumed run continue exactly where
the killed one stopped.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..anchors import default_gamma, position_weights, sample_anchors
from ..generation_dflare import target_fingerprint
from .args import TrainArgs, TrainingInputError
from .card import parent_totals, write_card
from .checkpoints import latest_checkpoint, save_checkpoint
from .draft_init import build_draft
from .evaluate import heldout_accuracy
from .features import TargetFeatures
from .loss import AccuracyMeter, block_loss, training_head
from .sequences import HELDOUT_SEQUENCES, Sequence, TrainingData, load_training_conversations, tokenize_training_data

logger = logging.getLogger(__name__)

#: What ``dflare train`` writes into its output folder, besides the code files ``save_pretrained``
#: copies from this package and sharded weights: a folder holding nothing else (and a config of
#: model_type dflare and a training summary) is a draft an earlier run wrote, which a new run may
#: replace. Anything else in an existing --output-dir is refused at the start of the run.
OUTPUT_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "training_summary.json", "README.md",
})
_WEIGHT_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _precision(args: TrainArgs, device_type: str) -> str:
    """Draft training precision for accelerate: "auto" is bf16 autocast on GPU and on a CPU that runs
    bf16 natively (AVX512-BF16/AMX: steps of the SmolLM2 draft measured 1.2-1.4x faster there, the
    same loss to 3 decimals), else fp32 ("no"). Master weights and optimizer state stay fp32."""
    if args.precision != "auto":
        return args.precision
    from ..cpu_kernels_dflare import bf16_is_native

    return "bf16" if device_type == "cuda" or bf16_is_native() else "no"


def _allow_new_precision(precision: str) -> None:
    """Let a second single-process run in this Python process use another precision than the first.

    accelerate keeps the precision in a process-wide singleton and refuses to change it; under
    ``accelerate launch`` (several processes) it stays untouched, as the launcher configured it.
    """
    from accelerate.state import AcceleratorState, PartialState

    current = AcceleratorState._shared_state.get("_mixed_precision")  # None: no Accelerator made yet
    if current not in (None, precision) and PartialState().num_processes == 1:
        AcceleratorState._reset_state()  # the process-group part (PartialState) is kept


def validate_args(args: TrainArgs) -> None:
    """Check what can be checked without loading a model, so a bad run fails in a second, not after
    the target loads, and leaves nothing behind."""
    for flag, value in (("--data", args.data), ("--heldout", args.heldout)):
        for source in (value or "").split(","):
            if source and source != "sharegpt" and not Path(source).exists():
                raise TrainingInputError(
                    f"{flag} {source!r} does not exist (expected 'sharegpt', a regenerated-answers folder, a .json or .jsonl file)"
                )
    if args.init_from and not (Path(args.init_from) / "config.json").is_file():
        raise TrainingInputError(f"--init-from {args.init_from!r} is not a draft folder (no config.json in it)")
    if args.grow_layers < 0 or (args.grow_layers and not args.init_from):
        raise TrainingInputError(
            f"--grow-layers {args.grow_layers}: expected a positive count of layers to add to an --init-from draft"
        )
    if not 0.0 <= args.distill <= 1.0:
        raise TrainingInputError(f"--distill {args.distill}: expected a weight from 0 (greedy labels only) to 1 (the target's distribution only)")
    if args.features_only and not args.hidden_cache:
        raise TrainingInputError("--features-only: expected --hidden-cache FOLDER too (the features are written there)")
    if not args.features_only:  # --features-only writes no draft
        check_output_dir(args.output_dir)
    if args.base_model:
        from ..publish_metadata import is_hub_id

        if not is_hub_id(args.base_model):
            raise TrainingInputError(f"--base-model {args.base_model!r}: expected the Hub id ORG/NAME of the target (not a local path)")
    if args.block_size is not None and args.block_size < 2:
        raise TrainingInputError(f"--block-size {args.block_size}: expected at least 2 (the anchor and one drafted token)")
    if args.num_anchors is not None and args.num_anchors < 1:
        raise TrainingInputError(f"--num-anchors {args.num_anchors}: expected a positive count (or leave it out for auto)")
    if args.batch_size < 1 or args.epochs <= 0 or args.lr <= 0:
        raise TrainingInputError(
            f"--batch-size {args.batch_size}, --epochs {args.epochs}, --lr {args.lr}: expected positive values"
        )


def _package_code_files() -> set[str]:
    """The names of this package's top-level modules: the code files ``save_pretrained`` copies."""
    return {p.name for p in Path(__file__).resolve().parent.parent.glob("*.py")}


def _written_by_train(path: Path, code_files: set[str]) -> bool:
    """Whether ``path`` (an entry of an output folder) is a file ``dflare train`` writes there."""
    if not path.is_file() or path.is_symlink():
        return False
    return path.name in OUTPUT_FILES or path.name in code_files or bool(_WEIGHT_SHARD.fullmatch(path.name))


def replaceable_problem(out: Path) -> str | None:
    """Why the existing path ``out`` is not a folder a training run may replace with its draft
    (None: it is empty, or a draft an earlier ``dflare train`` wrote and nothing else)."""
    if out.is_symlink() or not out.is_dir():
        return "is not a folder"
    entries = list(out.iterdir())
    if not entries:
        return None
    try:
        model_type = json.loads((out / "config.json").read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        model_type = None
    code_files = _package_code_files()
    foreign = sorted(p.name for p in entries if not _written_by_train(p, code_files))
    shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
    if model_type != "dflare" or not (out / "training_summary.json").is_file():
        return (f"holds no draft written by dflare train (no config.json of model_type 'dflare' with a training_summary.json)"
                + (f" but {shown}" if foreign else ""))
    if foreign:
        return f"holds files dflare train did not write ({shown})"
    return None


def check_output_dir(output_dir: str) -> None:
    """Refuse, before anything runs, an existing ``--output-dir`` whose content the finished run
    would replace: only an empty folder or a draft an earlier run wrote is replaced."""
    out = Path(output_dir)
    if not (out.exists() or out.is_symlink()):
        return
    problem = replaceable_problem(out)
    if problem:
        raise TrainingInputError(
            f"--output-dir {output_dir!r} exists and {problem}: the finished draft would replace it; "
            "choose a new folder, or empty this one first"
        )


def check_same_data(saved: dict | None, now: dict, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` on training data other than the data it was trained on (for
    example a regeneration still writing shards into the ``--data`` folder): the rest of the run
    would silently follow another stream, and the new sequences' target features would be computed
    first. Checkpoints written before the fingerprint existed carry none and are not checked."""
    if saved is None or saved == now:
        return
    raise TrainingInputError(
        f"the training data changed since {checkpoint}: {saved['sequences']} sequences then "
        f"(sha1 {saved['sha1'][:12]}), {now['sequences']} now (sha1 {now['sha1'][:12]}). Resume on the data "
        "the run started with (point --data at a folder of just those files), or start a new run "
        "(another --output-dir, --init-from a draft) on the new data"
    )


def anchors_for(sequence: Sequence, args: TrainArgs, block_size: int, generator: torch.Generator) -> torch.LongTensor:
    """The anchors of one training sequence: ``args.num_anchors``, or about one per ``block_size``
    response tokens (the blocks then cover the response once on average)."""
    count = args.num_anchors
    if count is None:
        count = max(1, math.ceil((sequence.input_ids.numel() - sequence.response_start) / block_size))
    return sample_anchors(sequence.response_start, sequence.input_ids.numel(), count, generator)


def train(args: TrainArgs, target=None, tokenizer=None) -> Path | None:
    """Run (or resume) a training run; returns the final Hub-ready draft folder (None with
    ``features_only``, which stops once the target features are cached).

    The run holds its work folder alone while it runs: a second run with the same work folder (the
    same --output-dir) is refused instead of overwriting the first one's checkpoints."""
    with contextlib.ExitStack() as held:
        return _train(args, target, tokenizer, held)


def run(args) -> int:
    """``dflare train``: build :class:`TrainArgs` from the parsed flags and train."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainArgs) if hasattr(args, f.name)}
    if values.get("draft_vocab_size") == 0:
        values["draft_vocab_size"] = None
    result = train(TrainArgs(**values))
    if result is None:
        print(f"target features cached in {args.hidden_cache}; nothing trained (--features-only)")
    return 0


def _work_lock(checkpoint_dir: Path):
    """An exclusive advisory lock on the checkpoints folder, held until the returned context exits;
    a TrainingInputError when another process holds it. Only the main process of a launch takes it
    (the others share the folder with it); without ``fcntl`` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return contextlib.nullcontext()
    if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0":
        return contextlib.nullcontext()
    handle = os.open(checkpoint_dir, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise TrainingInputError(
            f"another dflare train is running with the work folder {checkpoint_dir.parent} (its checkpoints would be "
            "overwritten): wait for it to finish, or give this run another --output-dir or --work-dir"
        ) from None
    return contextlib.closing(_Descriptor(handle))


class _Descriptor:
    """A file descriptor for :func:`contextlib.closing` (closing it releases its lock)."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _train(args: TrainArgs, target, tokenizer, held: contextlib.ExitStack) -> Path | None:
    from ..chat_templates import PromptFormat
    from ..target_info import check_prompt_format

    validate_args(args)
    if tokenizer is None:  # a target without a chat template fails here, before anything loads
        check_prompt_format(args.target, PromptFormat.from_args(args))
    generation_threads = torch.get_num_threads()  # what generate will run with: the cut tuner times on it
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work, checkpoint_dir = args.work_path, args.work_path / "checkpoints"
    created_work = not work.exists()
    try:
        accelerator = _start(args, checkpoint_dir, held)
        target, tokenizer, data = _load_inputs(args, accelerator, target, tokenizer)
    except BaseException:
        if created_work and latest_checkpoint(checkpoint_dir) is None:
            _remove_empty_work(work)
        raise

    draft, optimizer, scheduler, weights, accum, total_steps = _prepare(args, accelerator, target, data)
    step, state = _resume(accelerator, checkpoint_dir, data, total_steps)
    loop = _Loop(args, accelerator, draft, target, data.train, weights, accum, tokenizer)
    if loop.teacher is not None:  # before the feature pass: a target it cannot rebuild fails in seconds
        loop.check_teacher()
    feature_stats = {}
    if args.hidden_cache and accelerator.is_main_process:
        feature_stats = loop.features.fill(data.train + data.heldout, loop.layer_ids)
    accelerator.wait_for_everyone()
    if args.features_only:
        logger.info("--features-only: target features cached in %s (%s); nothing trained", args.hidden_cache, feature_stats)
        if created_work and latest_checkpoint(checkpoint_dir) is None:
            _remove_empty_work(work)
        return None
    if not state and not args.init_from:  # a fresh draft (a resumed run has the state of its checkpoint)
        loop.calibrate_output_scale()
    # a resumed run keeps the feature time of the launches before it (the cache they filled is reused)
    feature_stats["seconds_total"] = round(float(state.get("feature_seconds", 0.0)) + float(feature_stats.get("seconds") or 0.0), 3)
    history, curve, train_seconds = _run_steps(
        args, accelerator, loop, optimizer, scheduler, step, total_steps, state, feature_stats, data, checkpoint_dir
    )
    # the final held-out evaluation is the curve's last point (an evaluation at this step, whichever launch made it)
    final_eval = {key: curve[-1][key] for key in ("loss", "acc", "conditional_acc", "tau")} if data.heldout else {}
    consistency, tuning = _measure_and_tune(args, accelerator, loop, data.heldout, generation_threads)
    return _finish(
        args, accelerator, draft, target, (len(data.train), len(data.heldout), data.prompt_sources),
        total_steps, final_eval, history, train_seconds,
        feature_stats, consistency, tuning, curve,
    )


def _start(args: TrainArgs, checkpoint_dir: Path, held: contextlib.ExitStack):
    """Take the work folder (its lock, held by ``held``, and its log) and make the run's ``Accelerator``."""
    from accelerate import Accelerator

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    held.enter_context(_work_lock(checkpoint_dir))
    _log_to_file(args.work_path / "train.log")
    # One scheduler step per optimizer step: total_steps already counts steps of accum x processes
    # sequences (accelerate's default would step it once per process, ending the schedule early).
    precision = _precision(args, "cuda" if torch.cuda.is_available() else "cpu")
    _allow_new_precision(precision)
    return Accelerator(mixed_precision=precision, step_scheduler_with_optimizer=False)


def _load_inputs(args: TrainArgs, accelerator, target, tokenizer) -> tuple:
    """(target, tokenizer, :class:`TrainingData`): the given target and tokenizer or ``--target``'s, and
    the run's data tokenised once. The conversations are read first: bad data fails before the target loads."""
    from ..chat_templates import PromptFormat
    from ..targets import load_target, load_tokenizer

    train_conversations, heldout_conversations = load_training_conversations(args)
    target = target if target is not None else load_target(args.target, device=accelerator.device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(args.target, PromptFormat.from_args(args))
    data = tokenize_training_data(args, tokenizer, train_conversations, heldout_conversations)
    logger.info("training sequences: %d (skipped %s), held-out: %d", len(data.train), data.skipped, len(data.heldout))
    if not data.heldout:
        logger.warning(
            "no held-out sequences: nothing will measure generalisation (pass --heldout, or more data so the 2%% hash split is not empty)"
        )
    return target, tokenizer, data


def _prepare(args: TrainArgs, accelerator, target, data: TrainingData) -> tuple:
    """(draft, optimizer, scheduler, position weights, sequences per process and step, total steps): the
    draft built for ``target`` with its vocabulary, AdamW and a cosine schedule, prepared by accelerate."""
    from transformers import get_cosine_schedule_with_warmup

    draft = build_draft(args, target, data.train, data.vocab).to(accelerator.device)
    draft.train()
    block_size = draft.config.block_size
    gamma = args.gamma or default_gamma(block_size)
    weights = position_weights(block_size, gamma)
    accum = max(1, args.batch_size // accelerator.num_processes)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(data.train) / (accum * accelerator.num_processes)))
    optimizer = torch.optim.AdamW(draft.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, int(args.warmup_ratio * total_steps)), total_steps)
    draft, optimizer, scheduler = accelerator.prepare(draft, optimizer, scheduler)
    return draft, optimizer, scheduler, weights, accum, total_steps


def _resume(accelerator, checkpoint_dir: Path, data: TrainingData, total_steps: int) -> tuple[int, dict]:
    """(step, state) of the latest checkpoint, loaded into the prepared objects after checking that it
    trained on this data; (0, {}) when there is none."""
    resumed = latest_checkpoint(checkpoint_dir)
    if resumed is None:
        return 0, {}
    state = json.loads((resumed / "state.json").read_text())
    check_same_data(state.get("data"), data.fingerprint, resumed)
    accelerator.load_state(str(resumed))
    logger.info("resumed from %s at step %d of %d", resumed, state["step"], total_steps)
    return state["step"], state


def _run_steps(
    args: TrainArgs, accelerator, loop: "_Loop", optimizer, scheduler, step: int, total_steps: int, state: dict, feature_stats: dict,
    data: TrainingData, checkpoint_dir: Path,
) -> tuple[list[dict], list[dict], float]:
    """The optimizer steps from ``step`` to ``total_steps``, a held-out curve point every ``eval_every`` and
    a checkpoint every ``save_every``; then the draft goes back to generation's attention and the end of
    the run becomes the curve's last point. Returns (this launch's step metrics, the curve, the training
    seconds of every launch)."""
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not accelerator.is_main_process)
    history, seconds_before = [], float(state.get("train_seconds", 0.0))
    curve = list(state.get("curve", []))
    parent_hours = _cumulative(args, 0, 0, 0.0)["cpu_hours"]
    threads = torch.get_num_threads() * accelerator.num_processes
    feature_hours = feature_stats["seconds_total"] * threads / 3600
    heldout = data.heldout
    attention = _use_training_attention(accelerator.unwrap_model(loop.draft), accelerator.device)
    while step < total_steps:
        start = time.perf_counter()
        metrics = loop.step(step, optimizer, scheduler)
        step += 1
        metrics["seconds"] = time.perf_counter() - start
        history.append(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc1=f"{metrics['acc'][0]:.2f}", tau=f"{metrics['tau']:.2f}", tok_s=f"{metrics['tokens'] / metrics['seconds']:.0f}")
        if step % 10 == 0 or step == total_steps:
            logger.info("step %d/%d loss %.4f tau %.3f acc %s", step, total_steps, metrics["loss"], metrics["tau"], _fmt(metrics["acc"][:6]))
        if step % args.eval_every == 0 and heldout:
            seconds = seconds_before + sum(h["seconds"] for h in history)
            point = loop.curve_point(heldout, step, parent_hours + feature_hours + seconds * threads / 3600)
            curve.append(point)
            logger.info("held-out at step %d: %s", step, point)
        if step % args.save_every == 0 or step == total_steps:
            seconds = seconds_before + sum(h["seconds"] for h in history)
            save_checkpoint(
                accelerator,
                checkpoint_dir,
                {
                    "step": step, "total_steps": total_steps, "train_seconds": seconds, "curve": curve,
                    "feature_seconds": feature_stats["seconds_total"],
                    "args": dataclasses.asdict(args), "data": data.fingerprint,
                },
            )
    bar.close()
    accelerator.unwrap_model(loop.draft).set_attn_implementation(attention)  # what generation (and the cut tuner's timing) use
    # training is over: drop the mixed-precision wrapper accelerate put on the draft's forward, so the
    # final evaluation, the consistency check and the cut tuner see the model itself
    accelerator.unwrap_model(loop.draft, keep_fp32_wrapper=False)
    train_seconds = seconds_before + sum(h["seconds"] for h in history)
    if heldout and (not curve or curve[-1]["step"] != step):  # the end of the run is the curve's last point
        curve.append(loop.curve_point(heldout, step, parent_hours + feature_hours + train_seconds * threads / 3600))
    return history, curve, train_seconds


def _measure_and_tune(args: TrainArgs, accelerator, loop: "_Loop", heldout: list[Sequence], generation_threads: int) -> tuple[dict, dict]:
    """(consistency, tuning): on the main process, implied vs measured acceptance on the first held-out
    prompts and, with ``--tune-threshold``, the confidence cut, set in the draft's config; ({}, {})
    without held-out data or consistency prompts."""
    consistency, tuning = {}, {}
    if not (heldout and args.consistency_prompts and accelerator.is_main_process):
        return consistency, tuning
    from .consistency import measure_consistency, tune_threshold, tuned_settings

    inner = accelerator.unwrap_model(loop.draft)
    consistency = measure_consistency(inner, loop.target, loop.features, heldout[: args.consistency_prompts], loop.weights)
    if args.tune_threshold:
        # on every held-out (tune-half) answer, timed with the threads generation will have, not
        # this run's --threads (1 thread makes each verified token dearer and pushes the cut up)
        tuning = tune_threshold(inner, loop.target, loop.features, heldout, loop.weights, generation_threads)
        reason = _cut_timing_doubt(args.threads, generation_threads)
        if reason:
            logger.warning(
                "the confidence cut was timed with %d thread(s), but %s: re-choose it on a quiet machine with "
                "`dflare tune-cut %s --heldout %s --threads N` (N = the threads generation will use)",
                generation_threads, reason, args.output_dir, args.heldout,
            )
        for key, value in tuned_settings(tuning).items():
            setattr(inner.config, key, value)
        logger.info("confidence cut tuned on %d held-out answers: %s", tuning["heldout_answers"], tuning)
    return consistency, tuning


def _use_training_attention(draft, device: torch.device) -> str:
    """Switch the draft to eager attention for CPU training; returns the implementation to restore.

    Training attends from all anchor blocks at once under a sparse boolean mask, a case where the
    CPU SDPA kernel is slower than the plain masked softmax (the shipped draft, 8-16 real
    sequences, forward + backward in bf16 autocast, one thread: 5-17 % less time with eager, same
    losses to three decimals). Generation keeps its own choice (a short unmasked block)."""
    current = draft.config._attn_implementation
    if device.type == "cpu" and current == "sdpa":
        draft.set_attn_implementation("eager")
    return current


def _cut_timing_doubt(train_threads: int | None, generation_threads: int) -> str | None:
    """Why the run's own cut timings may not hold for generation, or None.

    OMP_NUM_THREADS below the core count limits the timing itself to fewer threads than a user's
    ``generate`` gets; ``--threads`` below the generation threads means the run was sized to share
    the machine with another job, which is then probably still running beside the timing."""
    cores = os.cpu_count() or 1
    if os.environ.get("OMP_NUM_THREADS") and generation_threads < cores:
        return (f"this machine has {cores} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} in this process; "
                "pass --threads instead to limit training alone)")
    if train_threads and train_threads < generation_threads:
        return (f"training ran with --threads {train_threads}, so another job probably shared the cores "
                "while the cut was timed")
    return None


def _fmt(values) -> str:
    return "[" + " ".join(f"{v:.2f}" for v in values) + "]"


def _remove_empty_work(work: Path) -> None:
    """Remove the work folder this run created (a failed start, or ``--features-only``) when it holds
    nothing but the run's own log and its empty checkpoints folder. Anything else in it (a
    ``--hidden-cache`` placed inside, a file someone put there) keeps the folder and all it holds:
    entries are removed one by one, never as a tree."""
    root = logging.getLogger("modeling_dflare")
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == work.resolve()]:
        handler.close()
        root.removeHandler(handler)
    if not work.is_dir() or work.is_symlink():
        return
    log, checkpoints = work / "train.log", work / "checkpoints"
    for entry in work.iterdir():
        own = (entry == log and entry.is_file() and not entry.is_symlink()) or (
            entry == checkpoints and entry.is_dir() and not entry.is_symlink() and not any(checkpoints.iterdir())
        )
        if not own:
            logger.info("kept the work folder %s: it holds %s", work, entry.name)
            return
    try:
        log.unlink(missing_ok=True)
        if checkpoints.is_dir():
            checkpoints.rmdir()
        work.rmdir()
    except OSError as error:  # something arrived meanwhile: it stays
        logger.info("kept the work folder %s (%s)", work, error)


class _Loop:
    """One optimizer step = ``accum`` sequences; the data stream is a deterministic function of the step."""

    def __init__(self, args, accelerator, draft, target, sequences, weights, accum, tokenizer=None):
        self.args, self.accelerator, self.draft, self.target = args, accelerator, draft, target
        self.sequences, self.weights, self.accum = sequences, weights, accum
        inner = accelerator.unwrap_model(draft)
        self.block_size = inner.config.block_size
        self.layer_ids = list(inner.config.target_layer_ids)
        self.features = TargetFeatures(
            target, args.hidden_cache, args.target_precision, args.storage, tokenizer=tokenizer, max_length=args.max_length
        )
        self.embed = target.get_input_embeddings()
        self.head_weight, self.token_to_draft = training_head(inner, target)
        self.teacher = None
        if args.distill > 0:
            from .distill import TeacherHead

            self.teacher = TeacherHead(target, self.layer_ids, self.head_weight)

    def _sequence(self, stream_index: int) -> tuple[Sequence, torch.Generator]:
        count = len(self.sequences)
        epoch, position = divmod(stream_index, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.args.seed * 100_003 + epoch))
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + stream_index)
        return self.sequences[int(order[position])], generator

    def check_teacher(self, minimum: float = 0.95) -> float:
        """Refuse ``--distill`` where the target's logits cannot be rebuilt from its features: the
        rebuilt argmax must be the cached greedy token at ``minimum`` of the first sequence's positions."""
        sequence = self.sequences[0]
        agreement = self.teacher.agreement(self.features(sequence, self.layer_ids), self.token_to_draft)
        logger.info("--distill: the rebuilt target logits pick the cached greedy token at %.4f of %r's positions", agreement, sequence.id)
        if not agreement >= minimum:
            raise TrainingInputError(
                f"--distill {self.args.distill}: the target's logits rebuilt from its cached features agree with its "
                f"greedy tokens at {agreement:.3f} of the positions of {sequence.id!r} (expected at least {minimum}); "
                "this target's layers do not run the Llama way: train without --distill"
            )
        return agreement

    def _loss(self, sequence: Sequence, anchors: torch.LongTensor, distill: bool = False):
        """The block loss of one sequence; ``distill`` mixes in the target's distribution
        (training steps only: evaluation and calibration keep the greedy-label loss, comparable across runs)."""
        features = self.features(sequence, self.layer_ids)
        return block_loss(
            self.draft, self.embed, self.head_weight, self.token_to_draft, sequence, features, anchors, self.weights,
            self.args.labels, teacher=self.teacher if distill else None, distill=self.args.distill,
        )

    def step(self, step: int, optimizer, scheduler) -> dict:
        meter, losses, tokens = AccuracyMeter(self.block_size), [], 0
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        for micro in range(self.accum):
            sequence, generator = self._sequence((step * self.accum + micro) * world + rank)
            # the head product and loss too, not only the draft's forward (accelerate wraps just that)
            with self.accelerator.autocast():
                result = self._loss(sequence, anchors_for(sequence, self.args, self.block_size, generator), distill=True)
            if not torch.isfinite(result.loss):
                raise FloatingPointError(
                    f"loss is {result.loss.item()} at step {step} (sequence {sequence.id!r}); the last good checkpoint "
                    f"is kept in {self.args.work_path / 'checkpoints'}: lower --lr and resume"
                )
            self.accelerator.backward(result.loss / self.accum)
            meter.add(result)
            losses.append(result.loss.item())
            tokens += sequence.input_ids.numel()
        self.accelerator.clip_grad_norm_(self.draft.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": sum(losses) / len(losses), "acc": meter.accuracy(), "tau": meter.acceptance_length(), "tokens": tokens}

    @torch.no_grad()
    def calibrate_output_scale(self, candidates=(1.0, 0.5, 0.25, 0.12, 0.06, 0.03), probes: int = 4) -> float:
        """Scale the fresh draft's final norm so its first logits are not absurdly confident.

        With tied embeddings, an untrained draft echoes its input embedding and the target's LM
        head turns that into a confident wrong guess (initial losses of 30+). Adam moves a norm
        weight by about ``lr`` per step, so a bad scale would take thousands of steps to undo: a
        line search over a few scales on a few sequences removes the problem before step 1.
        """
        norm = self.accelerator.unwrap_model(self.draft).norm.weight
        base = norm.detach().clone()
        losses = {}
        for scale in candidates:
            norm.copy_(base * scale)
            total = 0.0
            for index in range(min(probes, len(self.sequences))):
                sequence = self.sequences[index]
                anchors = anchors_for(sequence, self.args, self.block_size, torch.Generator().manual_seed(index))
                total += self._loss(sequence, anchors).loss.item()
            losses[scale] = total
        # a scale whose probe loss is not finite is never chosen
        best = min(losses, key=lambda scale: losses[scale] if math.isfinite(losses[scale]) else float("inf"))
        norm.copy_(base * best)
        logger.info("output scale calibration: loss by scale %s -> %s", {k: round(v / probes, 3) for k, v in losses.items()}, best)
        return best

    @torch.no_grad()
    def curve_point(self, heldout: list[Sequence], step: int, cpu_hours: float) -> dict:
        """One point of the learning curve: held-out accuracy, implied and walked acceptance."""
        from .consistency import measure_consistency

        # 6 decimals (3.6 ms): a tiny run's points, a second apart, must not round to the same value
        point = {"step": step, "cpu_hours": round(cpu_hours, 6), **self.evaluate(heldout)}
        inner = self.accelerator.unwrap_model(self.draft)
        walked = measure_consistency(inner, self.target, self.features, heldout, self.weights, run_generate=False)
        point["walk_tau"] = walked.get("walk_tau")
        return point

    def evaluate(self, heldout: list[Sequence], max_sequences: int = HELDOUT_SEQUENCES) -> dict:
        """:func:`heldout_accuracy` of the draft being trained (greedy-label loss, fixed anchors)."""
        return heldout_accuracy(self.draft, self._loss, heldout, self.block_size, max_sequences)



def _cumulative(args: TrainArgs, steps_here: int, sequences_seen: int, cpu_hours: float, prompt_sources: dict | None = None) -> dict:
    """Totals over a chain of ``--init-from`` warm starts: this run plus what the parent's summary says
    (``prompt_sources``: every prompt source any run of the chain trained on)."""
    parent = {}
    if args.init_from:
        summary = Path(args.init_from) / "training_summary.json"
        if summary.is_file():
            parent = parent_totals(json.loads(summary.read_text()))
    return {
        "runs": parent.get("runs", 0) + 1,
        "steps": parent.get("steps", 0) + steps_here,
        "sequences_seen": parent.get("sequences_seen", 0) + sequences_seen,
        "cpu_hours": round(parent.get("cpu_hours", 0.0) + cpu_hours, 3),
        "data": sorted(set(parent.get("data", [])) | {args.data or "sharegpt"}),
        "prompt_sources": sorted(set(parent.get("prompt_sources", [])) | set(prompt_sources or {})),
        "commands": parent.get("commands", []) + [" ".join(["dflare", "train", *sys.argv[2:]]) if sys.argv[1:2] == ["train"] else None],
    }


def _finish(
    args, accelerator, draft, target, counts, total_steps, final_eval, history, train_seconds, feature_stats, consistency, tuning,
    curve,
) -> Path:
    """Save the Hub-ready folder (bf16 weights, config, Hub files, model card) atomically."""
    out = Path(args.output_dir)
    if not accelerator.is_main_process:
        return out
    inner = accelerator.unwrap_model(draft)
    inner.config.target_name_or_path = inner.config.target_name_or_path or getattr(target.config, "name_or_path", None)
    inner.config.target_fingerprint = target_fingerprint(target)  # the weights trained against, whatever their name
    # a new folder of this process's own beside the output: nothing that exists is cleared to make room
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        inner.to(torch.bfloat16).save_pretrained(tmp)
        inner.to(torch.float32)
        out = _save_output(args, accelerator, inner, tmp, out, counts, total_steps, final_eval, history, train_seconds,
                           feature_stats, consistency, tuning, curve)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # this run's own unfinished folder
        raise
    logger.info("draft saved to %s (held-out: %s; consistency: %s)", out, final_eval, consistency)
    return out


def _save_output(
    args, accelerator, inner, tmp, out, counts, total_steps, final_eval, history, train_seconds, feature_stats, consistency, tuning,
    curve,
) -> Path:
    """Complete the draft in ``tmp`` (summary, card) and move it to ``out``; returns where it is."""
    from ..chat_templates import PromptFormat
    from ..publish_metadata import publish_record
    from .card import PROMPT_SOURCE_CARDS

    for file in tmp.iterdir():  # save_pretrained writes model.safetensors 0600: make the folder uniformly readable
        os.chmod(file, 0o644)
    threads = torch.get_num_threads() if not torch.cuda.is_available() else 1
    feature_seconds = feature_stats["seconds_total"]  # this launch's feature pass and the earlier launches'
    cpu_hours = (train_seconds + feature_seconds) * threads * accelerator.num_processes / 3600
    num_sequences, num_heldout, prompt_sources = counts
    summary = {
        "train_sequences": num_sequences,
        "heldout_sequences": num_heldout,
        "prompt_sources": prompt_sources,
        "steps": total_steps,
        "epochs": round(total_steps * args.batch_size / max(1, num_sequences), 3),
        "block_size": inner.config.block_size,
        "final_train_loss": history[-1]["loss"] if history else None,
        "heldout": final_eval,
        "consistency": consistency,
        "threshold_tuning": tuning,
        "curve": curve,
        "target_features": feature_stats,
        "args": dataclasses.asdict(args),
        "train_seconds": round(train_seconds, 1),
        "threads": threads,
        "precision": accelerator.mixed_precision,
        "cpu_hours": round(cpu_hours, 3),
        "cumulative": _cumulative(args, total_steps, total_steps * args.batch_size, cpu_hours, prompt_sources),
        # what the model card says of the target and the data (flags, else the target's metadata and the data cards)
        "publish": publish_record(
            target_source=args.target, loaded_name=inner.config.target_name_or_path, base_model=args.base_model, license=args.license,
            datasets=[d for d in args.dataset or [] if d != "none"] or None, data=args.data,
            prompt_format=PromptFormat.from_args(args), source_cards=PROMPT_SOURCE_CARDS,
        ),
    }
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2))
    write_card(tmp, inner, summary)
    return _install_output(tmp, out)


def _install_output(tmp: Path, out: Path) -> Path:
    """Move the finished draft folder ``tmp`` to ``out``; returns where it ended up.

    ``out`` is replaced only if it is still empty or an earlier run's draft (it was checked at the
    start, but hours passed): the old draft is renamed aside, the new one renamed in, and the old
    one's files, all written by dflare train, are removed one by one. If ``out`` meanwhile got files
    of someone else, nothing of it is touched and the new draft goes to a fresh sibling folder."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return out
    problem = replaceable_problem(out)
    if problem:
        kept = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(tmp, kept)
        logger.error("--output-dir %s %s now, so it was left as it is: the new draft is in %s", out, problem, kept)
        return kept
    old = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.old")
    os.replace(out, old)
    os.replace(tmp, out)
    code_files = _package_code_files()
    for entry in old.iterdir():
        if _written_by_train(entry, code_files):
            entry.unlink()
    try:
        old.rmdir()
    except OSError:  # a file arrived while the folders were swapped: it stays, with the old draft
        logger.warning("the previous draft of %s was kept in %s: it holds files dflare train did not write", out, old)
    return out


def _log_to_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("modeling_dflare")
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path.resolve()) for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
