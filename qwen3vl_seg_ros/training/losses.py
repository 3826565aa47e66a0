"""Training losses of Qwen3-VL-Seg: next-token cross-entropy on the answer, BCE + Dice on both
refinement masks, and the IoU head's regression to the true IoU of the final mask.

Masks are compared at the resolution of the decoder's input image, after the same bilinear
upsampling of the stride-4 logits that inference applies (:func:`upsample_logits`): the loss
then scores exactly the mask a user gets, sub-stride edges included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen3vl_seg_ros.model.mask_decoder import DecoderOutput, upsample_logits


@dataclass
class LossWeights:
    """The ``loss`` section of a training configuration."""

    lm: float = 1.0  # answer tokens
    mask_coarse: float = 0.5  # M1 (first refinement iteration)
    mask_fine: float = 1.0  # M2 (the final mask)
    bce: float = 1.0
    dice: float = 1.0
    iou: float = 1.0  # IoU head
    coord_l1: float = 0.0  # L1 of the expected coordinate value (0..1 units) at coordinate tokens
    pointer: float = 0.0  # auxiliary: the coordinate positions' states point at the target's visual token
    attribute: float = 0.0  # auxiliary: visual tokens resemble their object's colour and shape words
    lookup: float = 0.0  # auxiliary: the attention at the coordinate positions rests on the target's tokens
    choice: float = 0.0  # auxiliary: ... and of the attention on objects, on the target rather than the others
    choice_first: float = 0.0  # the choice loss again, at each box's first number only (where the object is chosen)


class CoordinateTable:
    """Which vocabulary ids are the coordinate tokens "0".."1000" (for soft coordinate labels)."""

    def __init__(self, number_ids: list[int], vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.ids = torch.tensor(number_ids, dtype=torch.long, device=device)
        value = torch.full((vocab_size,), -1, dtype=torch.long)
        value[torch.tensor(number_ids)] = torch.arange(len(number_ids))
        self.value = value.to(device)
        self.grid = torch.arange(len(number_ids), dtype=torch.float32, device=device)


def coordinate_l1(logp: torch.Tensor, target: torch.Tensor, coords: CoordinateTable) -> torch.Tensor:
    """Mean |E[value] - target| / 1000 over coordinate targets, E under the number-token softmax.

    Cross-entropy on a number token gives no signal about *how far* a wrong guess is; the
    expected value does (the distribution focal-loss idea of box regression). With a small
    sample budget (a CPU) this is what teaches a from-scratch model to localise at all.
    """
    value = coords.value[target]
    is_coord = value >= 0
    if not bool(is_coord.any()):
        return logp.sum() * 0.0
    probs = torch.softmax(logp[is_coord][:, coords.ids], dim=-1)
    expected = (probs * coords.grid[None]).sum(-1)
    scale = float(len(coords.grid) - 1)
    return ((expected - value[is_coord].float()).abs() / scale).mean()


def lm_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
            coords: CoordinateTable | None = None, coord_sigma: float = 0.0,
            coord_l1_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over the answer tokens; the head runs on those positions only.

    ``rows``/``cols`` index the positions whose *next* token is an answer token (precomputed by
    the collator, so no host synchronisation is needed to find them). ``coord_sigma`` > 0
    replaces the one-hot target of a coordinate token by a normal distribution over the
    coordinate values around it (standard deviation in 0..1000 units): an early-training aid
    that rewards near misses; 0 gives plain cross-entropy, which is what makes the final model
    confident in one value (its box score).
    """
    target = labels[rows, cols + 1]
    logits = lm_head(hidden[rows, cols]).float()
    logp = F.log_softmax(logits, dim=-1)
    per_token = -logp.gather(1, target[:, None])[:, 0]
    if coords is not None and coord_sigma > 0:
        value = coords.value[target]
        centre = value.clamp(min=0).float()[:, None]
        soft = torch.exp(-0.5 * ((coords.grid[None] - centre) / coord_sigma) ** 2)
        soft = soft / soft.sum(-1, keepdim=True)
        soft_loss = -(soft * logp[:, coords.ids]).sum(-1)
        per_token = torch.where(value >= 0, soft_loss, per_token)
    with torch.no_grad():
        predicted = logits.argmax(-1)
        correct = (predicted == target).float()
        stats = {"token_acc": correct.mean() if target.numel() else correct.sum()}
        if coords is not None:  # the most likely coordinate value vs the target's, in 0..1000 units
            value = coords.value[target]
            guess = logits[:, coords.ids].argmax(-1)  # among the number tokens: localisation alone
            is_coord = (value >= 0).float()
            stats["coord_mae"] = ((guess - value).abs().float() * is_coord).sum() / is_coord.sum().clamp(min=1.0)
    loss = per_token.mean() if target.numel() else hidden.sum() * 0.0
    if coords is not None and coord_l1_weight > 0 and target.numel():
        l1 = coordinate_l1(logp, target, coords)
        stats["coord_l1"] = l1.detach()
        loss = loss + coord_l1_weight * l1
    return loss, stats


def pointer_loss(hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, lm_rows: torch.Tensor,
                 lm_cols: torch.Tensor, sample_grids: torch.Tensor, object_boxes: torch.Tensor,
                 object_batch: torch.Tensor, coords: CoordinateTable, image_token_id: int, merge: int,
                 scale: float = 10.0) -> tuple[torch.Tensor, dict]:
    """Auxiliary grounding loss: each box's coordinate positions should resemble its object's visual token.

    Why: reading a box off the image needs two things learned together, attending to the
    object's visual token and turning what it holds into numbers; neither pays off alone, and a
    small model trained from scratch on a small budget sits on that plateau, answering with
    boxes that ignore the image. This loss rewards the first half directly: the final states at
    the positions that write a box's four numbers, compared (scaled cosine) with the states of
    the sample's visual tokens, must pick the merged token under the box centre (cross-entropy
    over the visual tokens). It adds no parameters, so nothing changes at inference.
    ``sample_grids`` is ``(B, 3)`` (t, h, w patches of each sample's image); boxes are relative
    (0..1) in answer order. Returns the loss and its hit rate (``pointer_acc``; chance ~1/tokens).

    The whole batch is handled at once, with no loop over samples: the per-sample version issued
    ~200 small operations and several host syncs per sample, 58k of a batch-256 step's 111k
    operations (counted on the CPU), and a model this small spends its GPU step launching them.
    """
    is_image = input_ids == image_token_id
    found = _box_queries(input_ids, labels, lm_rows, lm_cols, sample_grids, object_batch, coords, is_image, merge)
    if found is None:
        return hidden.sum() * 0.0, {}
    rows, cols, obj, _ = found
    cells = _centre_cells(object_boxes, object_batch, sample_grids, merge)[obj]
    logits = _visual_token_logits(hidden, rows, cols, is_image, scale)
    loss = F.cross_entropy(logits, cells)
    return loss, {"pointer_acc": (logits.argmax(-1) == cells).float().mean().detach()}


def lookup_loss(attentions: Sequence[torch.Tensor], input_ids: torch.Tensor, labels: torch.Tensor,
                lm_rows: torch.Tensor, lm_cols: torch.Tensor, sample_grids: torch.Tensor,
                object_boxes: torch.Tensor, object_batch: torch.Tensor, coords: CoordinateTable,
                image_token_id: int, merge: int) -> tuple[torch.Tensor, dict]:
    """Auxiliary grounding loss on the attention itself: at the positions that write a box's
    numbers, the language model's visual attention must rest on that object's tokens.

    Why: ``pointer_loss`` compares final states, and a coordinate position can match its
    object's token by what both say (the label just written, the colour the token holds)
    without ever attending to it; it reached 70 % hits while the attention of the shipped model
    at the box's first number put at most 0.22 of its visual share on the target and the number
    written was no nearer than a random object's (``bench/attention_on_target.py``,
    docs/training.md). This loss trains the lookup: in every layer but the first (whose states
    at a number position cannot yet know the object), the heads' attention over the sample's
    visual tokens, renormalised over those tokens and averaged over heads, gives a share on the
    object's box cells (:func:`box_cells`), and the loss is its negative log. Only how the
    visual attention is spread is trained, not how much of it goes to the image. No parameters:
    nothing changes at inference. ``attentions``: the layers' ``(B, H, L, L)`` probabilities
    (eager attention). Returns the loss and ``lookup_share`` (the mean share; uniform ~ the
    box's fraction of the image).
    """
    zero, found = _attention_queries(attentions, input_ids, labels, lm_rows, lm_cols, sample_grids, object_batch,
                                     coords, image_token_id, merge)
    if found is None:
        return zero, {}
    rows, cols, obj, _, positions, n_image = found
    cells = box_cells(object_boxes, object_batch, sample_grids, merge)[obj]  # (N, T')
    keys = positions[rows]  # (N, T)
    valid = torch.arange(keys.shape[1], device=keys.device)[None, :] < n_image[rows, None]
    if cells.shape[1] < keys.shape[1]:
        cells = F.pad(cells, (0, keys.shape[1] - cells.shape[1]))
    on_box = cells[:, :keys.shape[1]] & valid
    shares = []
    for visual in _visual_attention(attentions, rows, cols, keys):
        visual = visual * valid[:, None, :]
        shares.append(((visual * on_box[:, None, :]).sum(-1) / visual.sum(-1).clamp_min(1e-12)).mean(1))
    return _log_share_loss(shares, "lookup_share")


def choice_loss(attentions: Sequence[torch.Tensor], input_ids: torch.Tensor, labels: torch.Tensor,
                lm_rows: torch.Tensor, lm_cols: torch.Tensor, sample_grids: torch.Tensor,
                object_batch: torch.Tensor, object_instances: torch.Tensor, token_objects: torch.Tensor,
                coords: CoordinateTable, image_token_id: int,
                merge: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Auxiliary grounding loss on the choice between objects: at the positions that write a
    box's numbers, of the visual attention that lands on objects, the target's part.

    Why: round 12's lookup loss taught the heads to look at objects (their share on objects
    0.40 -> 0.69) but not to choose: in scenes of three or more objects every head spread that
    attention evenly over them (the target's part equal to its share of the object tokens, to
    within 0.006), though the state at that position held the named colour after layer 0
    (``bench/attention_on_target.py``). This loss leaves where objects are aside and trains
    only the choice: per layer but the first, the heads' mean attention on the target's tokens
    over their attention on the tokens of all objects, as a negative log. Boxes whose scene has
    no other object (nothing to choose) and objects without an instance map are left out.
    ``token_objects`` ``(B, T)`` is per *sample* (the batch's per-image rows indexed by sample),
    ``object_instances`` ``(N,)`` each object's id in it. Returns the loss over all four
    positions, the same loss at each box's first number alone, and ``choice_share`` (the
    target's mean part; uniform ~ 1 / objects) and ``choice_first_share``, the same at the first
    number. Both losses come from one pass over the attention.

    The first-number loss trains that position alone. Why: once a box's first number is written, the
    positions that write the other three can find the object by its place (a token in that
    column) rather than by what the command says, so over all four positions the share looks
    chosen (0.73-0.75 in round 15b's training) while at the first number, the only position
    where the command alone decides, the bench found the attention on objects spread evenly.
    """
    zero, found = _attention_queries(attentions, input_ids, labels, lm_rows, lm_cols, sample_grids, object_batch,
                                     coords, image_token_id, merge)
    if found is None:
        return zero, zero, {}
    rows, cols, obj, slot, positions, n_image = found
    owner = token_objects[rows][:, :positions.shape[1]]  # (N, T): instance id on each visual token
    valid = torch.arange(owner.shape[1], device=owner.device)[None, :] < n_image[rows, None]
    target = (owner == object_instances[obj][:, None]) & valid
    on_objects = (owner > 0) & valid
    keep = (object_instances[obj] > 0) & target.any(1) & (on_objects & ~target).any(1)
    if not bool(keep.any()):
        return zero, zero, {}
    rows, cols, target, on_objects, first = rows[keep], cols[keep], target[keep], on_objects[keep], slot[keep] == 0
    shares = []
    for visual in _visual_attention(attentions, rows, cols, positions[rows]):
        visual = visual.mean(1)  # (N, T): the heads' mean
        shares.append((visual * target).sum(-1) / (visual * on_objects).sum(-1).clamp_min(1e-12))
    loss, stats = _log_share_loss(shares, "choice_share")
    if not bool(first.any()):
        return loss, zero, stats
    first_loss, first_stats = _log_share_loss([share[first] for share in shares], "choice_first_share")
    return loss, first_loss, {**stats, **first_stats}


def _attention_queries(attentions: Sequence[torch.Tensor], input_ids: torch.Tensor, labels: torch.Tensor,
                       lm_rows: torch.Tensor, lm_cols: torch.Tensor, sample_grids: torch.Tensor,
                       object_batch: torch.Tensor, coords: CoordinateTable, image_token_id: int,
                       merge: int) -> tuple[torch.Tensor, tuple | None]:
    """What the attention losses start from: a zero loss that keeps the graph, and, where there
    is something to train (two layers or more, box-writing positions), ``(rows, cols, obj)`` of
    :func:`_box_queries` plus the visual-token positions and counts of :func:`_visual_positions`."""
    zero = attentions[0].sum() * 0.0 if attentions else labels.new_zeros((), dtype=torch.float32)
    if len(attentions) < 2:
        return zero, None
    is_image = input_ids == image_token_id
    found = _box_queries(input_ids, labels, lm_rows, lm_cols, sample_grids, object_batch, coords, is_image, merge)
    if found is None:
        return zero, None
    return zero, (*found, *_visual_positions(is_image))


def _visual_attention(attentions: Sequence[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor,
                      keys: torch.Tensor) -> Iterator[torch.Tensor]:
    """Per layer but the first (whose states at a number position cannot yet know the object), the
    query positions' attention ``(N, H, T)`` on the sequence positions ``keys`` ``(N, T)``."""
    for attention in attentions[1:]:
        weights = attention[rows, :, cols].float()  # (N, H, L)
        yield weights.gather(2, keys[:, None, :].expand(-1, weights.shape[1], -1))


def _log_share_loss(shares: list[torch.Tensor], name: str) -> tuple[torch.Tensor, dict]:
    """The mean over layers of the negative log of each query's share ``(N,)``, and the mean share as ``name``."""
    losses = [-torch.log(share.clamp_min(1e-6)).mean() for share in shares]
    return torch.stack(losses).mean(), {name: torch.stack([share.detach().mean() for share in shares]).mean()}


def attribute_loss(merged: torch.Tensor, targets: torch.Tensor, word_embeddings: list[torch.Tensor],
                   scale: float = 10.0) -> tuple[torch.Tensor, dict]:
    """Auxiliary grounding loss: a visual token on an object must resemble the words that name it.

    Why: the commands pick objects by colour and shape words, and the language model can only
    match a word with a visual token that holds what the word means. In the shipped tiny
    model after seven rounds a linear probe (``bench/probe_visual_tokens.py``) read the colour
    of the object under a merged token in 72 % of held-out tokens (the ViT's first block: 89 %;
    raw pixel statistics: 82 %) and its shape at chance: the tokens the language model reads
    had lost much of what tells the objects apart. Here each merged token covered by an
    object (``targets`` ``(T, G)``, class per attribute group, -1 = none) is compared, by scaled
    cosine, with the input embeddings of the group's words (``word_embeddings[g]`` ``(n_g, D)``,
    the vectors the command's words enter the model as) and must pick its object's word
    (cross-entropy). Round 9 of the tiny model: colour 0.72 -> 0.99, shape still at chance,
    grounding unchanged (docs/training.md). No parameters: nothing
    changes at inference. Returns the mean over the groups and ``attr_acc`` (hit rate).
    """
    if not word_embeddings:
        return merged.sum() * 0.0, {}
    tokens = F.normalize(merged.float(), dim=-1)
    total = hits = labelled = merged.new_zeros((), dtype=torch.float32)
    for g, words in enumerate(word_embeddings):
        target = targets[:, g]
        logits = scale * tokens @ F.normalize(words.float(), dim=-1).T
        valid = (target >= 0).float()
        ce = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
        total = total + (ce * valid).sum() / valid.sum().clamp(min=1.0)
        hits = hits + ((logits.argmax(-1) == target).float() * valid).sum()
        labelled = labelled + valid.sum()
    return total / len(word_embeddings), {"attr_acc": (hits / labelled.clamp(min=1.0)).detach()}


def _group_starts(counts: torch.Tensor) -> torch.Tensor:
    """Where each group begins in a tensor sorted by group, from the groups' sizes."""
    return torch.cumsum(counts, 0) - counts


def _rank_in_group(groups: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Position of each element within its group (``groups`` sorted, ``counts`` their sizes)."""
    return torch.arange(groups.numel(), device=groups.device) - _group_starts(counts)[groups]


def _coordinate_groups(rows: torch.Tensor, cols: torch.Tensor, batch: int,
                       length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The coordinate positions sorted by sample then position, which box each writes (the k-th
    group of four positions of a sample writes its k-th box), which of the box's four numbers
    (0..3), and how many positions each sample has."""
    order = torch.argsort(rows * length + cols)
    rows, cols = rows[order], cols[order]
    per_sample = torch.bincount(rows, minlength=batch)
    rank = _rank_in_group(rows, per_sample)
    return rows, cols, torch.div(rank, 4, rounding_mode="floor"), rank % 4, per_sample


def _grid_cells(sample_grids: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged visual-token rows and columns of each sample's image."""
    gh = torch.div(sample_grids[:, 1], merge, rounding_mode="floor")
    gw = torch.div(sample_grids[:, 2], merge, rounding_mode="floor")
    return gh, gw


def _box_queries(input_ids: torch.Tensor, labels: torch.Tensor, lm_rows: torch.Tensor, lm_cols: torch.Tensor,
                 sample_grids: torch.Tensor, object_batch: torch.Tensor, coords: CoordinateTable,
                 is_image: torch.Tensor,
                 merge: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The positions that write a box's numbers, the object each box is of and which of its four
    numbers each writes: ``(rows, cols, obj, slot)`` with ``obj`` an index into the batch's object
    tensors and ``slot`` 0..3 (x1, y1, x2, y2); ``None`` when there are none.

    The k-th group of four coordinate positions of a sample writes its k-th object (answer order);
    only the first min(boxes written, boxes there) count, and only in samples whose visual tokens
    fill their grid (a truncated sequence does not: its objects are left out).
    """
    target = labels[lm_rows, lm_cols + 1]
    is_coord = coords.value[target] >= 0
    rows, cols = lm_rows[is_coord], lm_cols[is_coord]
    if rows.numel() == 0 or object_batch.numel() == 0:
        return None
    batch, length = input_ids.shape
    rows, cols, box, slot, per_sample = _coordinate_groups(rows, cols, batch, length)
    gh, gw = _grid_cells(sample_grids, merge)
    grid_ok = is_image.sum(1) == sample_grids[:, 0] * gh * gw
    objects = torch.bincount(object_batch, minlength=batch)
    keep = (box < torch.minimum(per_sample // 4, objects)[rows]) & grid_ok[rows]
    rows, cols, box, slot = rows[keep], cols[keep], box[keep], slot[keep]
    if rows.numel() == 0:
        return None
    answer_order = torch.sort(object_batch, stable=True).indices  # each sample's objects, in answer order
    return rows, cols, answer_order[_group_starts(objects)[rows] + box], slot


def _centre_cells(object_boxes: torch.Tensor, object_batch: torch.Tensor, sample_grids: torch.Tensor,
                  merge: int) -> torch.Tensor:
    """Each object's merged visual-token cell under its box centre (row-major index)."""
    gh, gw = _grid_cells(sample_grids, merge)
    oh, ow = gh[object_batch], gw[object_batch]
    cx = torch.minimum(((object_boxes[:, 0] + object_boxes[:, 2]) / 2 * ow).long().clamp(min=0), ow - 1)
    cy = torch.minimum(((object_boxes[:, 1] + object_boxes[:, 3]) / 2 * oh).long().clamp(min=0), oh - 1)
    return cy * ow + cx


def box_cells(object_boxes: torch.Tensor, object_batch: torch.Tensor, sample_grids: torch.Tensor,
              merge: int) -> torch.Tensor:
    """``(O, T)`` bool: the merged visual tokens of each object's box, row-major, ``T`` the most
    tokens of a sample: every cell whose centre lies in the box, and the cell under the box centre
    (so a box smaller than a cell still has one)."""
    gh, gw = _grid_cells(sample_grids, merge)
    oh, ow = gh[object_batch], gw[object_batch]
    width = int((gh * gw).max())
    index = torch.arange(width, device=object_boxes.device)
    row = torch.div(index[None, :], ow[:, None], rounding_mode="floor")
    col = index[None, :] - row * ow[:, None]
    y = (row.float() + 0.5) / oh[:, None]
    x = (col.float() + 0.5) / ow[:, None]
    b = object_boxes.float()
    inside = (x >= b[:, 0:1]) & (x <= b[:, 2:3]) & (y >= b[:, 1:2]) & (y <= b[:, 3:4])
    inside &= index[None, :] < (oh * ow)[:, None]
    centre = _centre_cells(object_boxes, object_batch, sample_grids, merge)
    inside[torch.arange(b.shape[0], device=b.device), centre] = True
    return inside


def _visual_positions(is_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence position of each sample's t-th visual token ``(B, T)`` (0 past its last) and how
    many each sample has ``(B,)``; ``T`` the most of a sample."""
    n_image = is_image.sum(1)
    width = int(n_image.max()) if n_image.numel() else 0
    token_slot = torch.cumsum(is_image, 1) - 1
    s_idx, l_idx = torch.nonzero(is_image, as_tuple=True)
    positions = torch.zeros(is_image.shape[0], width, dtype=torch.long, device=is_image.device)
    positions[s_idx, token_slot[s_idx, l_idx]] = l_idx
    return positions, n_image


def _visual_token_logits(hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, is_image: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Scaled cosine of each query position's state with every visual token of its own sample:
    ``(N, T)``, padded to the most visual tokens of a sample with -inf.

    One batched product over the samples that have queries, each padded to the most queries of
    a sample, so memory stays (samples x queries x tokens) rather than (queries x tokens x width).
    """
    samples, slot_sample = torch.unique_consecutive(rows, return_inverse=True)
    count = torch.bincount(slot_sample)
    slot = _rank_in_group(slot_sample, count)
    positions, n_image = _visual_positions(is_image[samples])
    width = positions.shape[1]
    keys = F.normalize(hidden[samples[:, None], positions].float(), dim=-1)  # (S, T, D)
    queries = F.normalize(hidden[rows, cols].float(), dim=-1)  # (N, D)
    padded = queries.new_zeros(samples.numel(), int(count.max()), queries.shape[-1])
    padded = padded.index_put((slot_sample, slot), queries)
    logits = scale * torch.bmm(padded, keys.transpose(1, 2))[slot_sample, slot]  # (N, T)
    valid = torch.arange(width, device=rows.device)[None, :] < n_image[slot_sample, None]
    return logits.masked_fill(~valid, float("-inf"))


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-object soft Dice loss ``(N,)``: overlap of sigmoid(logits) with the target mask."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    inter = (prob * target).sum(-1)
    return 1.0 - (2.0 * inter + 1.0) / (prob.sum(-1) + target.sum(-1) + 1.0)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU ``(N,)`` of the thresholded logits (> 0, as inference) with the target masks."""
    pred = (logits > 0).flatten(1)
    gt = target.flatten(1) > 0.5
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_losses(out: DecoderOutput, target_masks: torch.Tensor,
                weights: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BCE + Dice on M1 and M2 (weighted ``mask_coarse`` / ``mask_fine``) and the IoU head loss.

    ``target_masks``: ``(N, h, w)`` at the decoder image's size. The IoU head learns the IoU of
    the *detached* final mask: it must judge the mask, not change it.
    """
    height, width = target_masks.shape[-2:]
    target = target_masks.float()
    total = target.new_zeros(())
    stats: dict[str, torch.Tensor] = {}
    fine_logits = None
    for name, logits, weight in (("m1", out.mask_logits[0], weights.mask_coarse),
                                 ("m2", out.mask_logits[1], weights.mask_fine)):
        up = upsample_logits(logits, height, width)
        bce = F.binary_cross_entropy_with_logits(up, target)
        dice = dice_loss(up, target).mean()
        total = total + weight * (weights.bce * bce + weights.dice * dice)
        stats[f"{name}_bce"] = bce.detach()
        stats[f"{name}_dice"] = dice.detach()
        fine_logits = up
    with torch.no_grad():
        true_iou = mask_iou(fine_logits, target)
    iou_loss = F.mse_loss(out.iou.float(), true_iou)
    total = total + weights.iou * iou_loss
    stats["iou_loss"] = iou_loss.detach()
    stats["mask_iou"] = true_iou.mean()
    return total, stats
