"""The training objective: all anchor blocks of a sequence in one draft pass, position-weighted CE.

Labels are the target's own greedy choices on on-policy positions (:func:`target_labels`); the
loss at block position k is weighted ``exp(-(k-1)/gamma)`` because one miss ends the accepted
prefix. :class:`AccuracyMeter` turns per-block correctness into the acceptance length it implies.
"""

import dataclasses

import torch
from torch.nn import functional as F

from ..anchors import block_inputs, block_mask, expected_acceptance
from ..modeling_dflare import DFlareModel
from .sequences import Sequence
from .features import Features


def target_labels(
    input_ids: torch.LongTensor, predictions: torch.LongTensor, positions: torch.LongTensor, labels: torch.LongTensor, block_size: int
) -> torch.LongTensor:
    """Replace data labels by the target's greedy predictions, keeping only on-policy positions.

    The label of block position k becomes the target's greedy token after position ``a + k - 1``
    (given the data prefix). It is kept only while the data in the block so far agrees with the
    target's greedy choices, because only then is that prefix the one the draft meets at inference.
    On data regenerated greedily by the target, nothing changes; on human-written data, the draft
    still learns the target's own next-token choices.
    """
    length = input_ids.shape[0]
    inside = positions < length
    previous = (positions - 1).clamp(0, length - 1)
    new_labels = torch.where(inside & (labels >= 0), predictions[previous], torch.full_like(labels, -100))
    agree = torch.zeros_like(inside)
    agree[inside] = input_ids[positions[inside]] == predictions[previous[inside]]
    agree = agree.view(-1, block_size)
    # position k needs agreement at positions 1 .. k-1 of its block
    ok = torch.ones_like(agree)
    ok[:, 2:] = agree[:, 1:-1].long().cumprod(dim=1).bool()
    return torch.where(ok.view(-1), new_labels, torch.full_like(new_labels, -100))


def training_head(draft: DFlareModel, target: torch.nn.Module) -> tuple[torch.Tensor, torch.LongTensor | None]:
    """(LM head rows the draft is scored with, full-vocabulary id -> draft-vocabulary index or None).

    The map holds -1 for tokens outside a reduced draft vocabulary (their labels are not learnable);
    it is None when the draft proposes from the whole vocabulary.
    """
    head = target.get_output_embeddings().weight.detach()
    ids = draft.draft_vocab_ids
    if ids is None:
        return head, None
    ids = ids.to(head.device)
    token_to_draft = torch.full((head.shape[0],), -1, dtype=torch.long, device=head.device)
    token_to_draft[ids] = torch.arange(ids.numel(), device=head.device)
    return head[ids], token_to_draft


@dataclasses.dataclass
class BlockResult:
    loss: torch.Tensor
    correct: torch.BoolTensor  # [A, B-1] draft argmax == label (False where no label)
    valid: torch.BoolTensor  # [A, B-1]
    confidence: torch.Tensor | None = None  # [A, B-1] the draft's top probability (with_confidence=True)


def block_loss(
    draft: DFlareModel,
    embed: torch.nn.Module,
    head_weight: torch.Tensor,
    token_to_draft: torch.LongTensor | None,
    sequence: Sequence,
    features: Features,
    anchors: torch.LongTensor,
    weights: torch.Tensor,
    labels_from: str = "target",
    with_confidence: bool = False,
    teacher=None,
    distill: float = 0.0,
) -> BlockResult:
    """Weighted CE of all anchor blocks of one sequence in a single draft pass.

    ``labels_from="target"``: labels are the target's greedy predictions on on-policy positions
    (see :func:`target_labels`); ``"data"``: the data tokens themselves. With a ``teacher``
    (:class:`~modeling_dflare.training.distill.TeacherHead`) and ``distill`` = alpha > 0, each labelled
    position's loss is ``(1 - alpha) * CE(greedy label) + alpha * CE(the target's distribution over
    the draft vocabulary)``.
    """
    config = getattr(draft, "module", draft).config  # DDP/FSDP wrappers keep the model in .module
    block, device = config.block_size, features.hidden.device
    ids = sequence.input_ids.to(device)
    anchors = anchors.to(device)
    tokens, positions, labels = block_inputs(ids, anchors, block, config.mask_token_id)
    if labels_from == "target":
        labels = target_labels(ids, features.predictions.to(device), positions, labels, block)
    length = ids.shape[0]
    dtype = next(draft.parameters()).dtype
    out = draft(
        noise_embeds=embed(tokens)[None].to(dtype),
        context_hidden_states=features.hidden.to(dtype),
        position_ids=torch.cat([torch.arange(length, device=device), positions])[None],
        attention_mask=block_mask(anchors, length, block)[None, None],
    )
    hidden = out.last_hidden_state[0]
    valid = labels >= 0
    target_ids = labels.clamp_min(0)
    if token_to_draft is not None:
        target_ids = token_to_draft[target_ids]
        valid_loss = valid & (target_ids >= 0)
    else:
        valid_loss = valid
    logits = hidden[valid_loss].to(head_weight.dtype) @ head_weight.T
    position_weight = weights.to(device).repeat(anchors.numel())[valid_loss]
    ce = F.cross_entropy(logits.float(), target_ids[valid_loss], reduction="none")
    if teacher is not None and distill > 0:
        from .distill import soft_cross_entropy

        rows = (positions - 1).clamp(0, length - 1)[valid_loss]
        ce = (1 - distill) * ce + distill * soft_cross_entropy(logits, teacher.logits(features, rows))
    loss = (ce * position_weight).sum() / position_weight.sum().clamp_min(1e-6)
    correct = torch.zeros_like(valid)
    correct[valid_loss] = logits.argmax(-1) == target_ids[valid_loss]
    shape = (anchors.numel(), block)
    confidence = None
    if with_confidence:  # what the generator's confidence cut reads, at every block position
        with torch.no_grad():
            every = hidden.detach().to(head_weight.dtype) @ head_weight.T
            confidence = torch.softmax(every.float(), dim=-1).amax(-1).view(shape)[:, 1:]
    return BlockResult(loss, correct.view(shape)[:, 1:], valid.view(shape)[:, 1:], confidence)


class AccuracyMeter:
    """Per-position accuracy and the acceptance length it implies.

    ``accuracy()`` is the plain per-position accuracy; ``conditional_accuracy()`` counts position k
    only in blocks whose positions 1..k-1 were all right (what acceptance depends on: the target
    never sees position k otherwise). ``acceptance_length()`` is 1 + the mean leading run of
    correct positions, the tau a lossless generator would measure on these blocks without a cut.
    """

    def __init__(self, block_size: int):
        self.correct = torch.zeros(block_size - 1)
        self.total = torch.zeros(block_size - 1)
        self.blocks: list[torch.Tensor] = []

    def add(self, result: BlockResult) -> None:
        self.correct += (result.correct & result.valid).sum(0).float().cpu()
        self.total += result.valid.sum(0).float().cpu()
        self.blocks.append((result.correct & result.valid).cpu())

    def accuracy(self) -> list[float]:
        return (self.correct / self.total.clamp_min(1)).tolist()

    def conditional_accuracy(self) -> list[float]:
        if not self.blocks:
            return []
        correct = torch.cat(self.blocks).long()
        reached = torch.ones_like(correct)
        reached[:, 1:] = correct[:, :-1].cumprod(dim=1)
        hits = (correct * reached).sum(0).float()
        return (hits / reached.sum(0).float().clamp_min(1)).tolist()

    def acceptance_length(self) -> float:
        return expected_acceptance(torch.cat(self.blocks)) if self.blocks else float("nan")
