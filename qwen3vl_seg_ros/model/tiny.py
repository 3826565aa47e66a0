"""Tiny Qwen3-VL checkpoints for tests, demos and training from scratch; reference model sizes.

No real weights can be downloaded on the development machines, so tests build a tiny but
architecturally complete Qwen3-VL here: a word-level task tokenizer (chat and vision special
tokens, ``<|seg|>``, JSON punctuation, the numbers 0..1000 as single tokens, and the words of
tabletop scenes), a Qwen3-VL image processor with small pixel limits, a chat template, and a
randomly initialised ``Qwen3VLForConditionalGeneration``. :func:`build_tiny_checkpoint` saves
them in the layout of a Hugging Face checkpoint so that the production loader reads them like
a downloaded model.

A random language model answers gibberish; ``answer=`` makes the builder fit it for a few
seconds to always give one fixed answer, which exercises the whole pipeline (JSON parsing, mask
token, decoder) without a trained model. The training engineer uses the same builder with
larger sizes (``text_hidden=256, vision_hidden=128, ...``) and ``answer=None``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwen3vl_seg_ros.grounding import PROMPT_TEMPLATES, SEG_TOKEN, build_prompt, format_answer

#: Qwen3-VL's special tokens that its processor and chat template use, then ours.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    SEG_TOKEN,
)
UNK_TOKEN = "<unk>"

#: A minimal chat template producing Qwen3-VL's format (image placeholder, then text).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Words of tabletop scenes and of grounding answers (besides the prompt templates' words).
TABLETOP_WORDS = (
    "red", "green", "blue", "yellow", "orange", "purple", "white", "black", "grey", "gray", "brown", "pink",
    "cyan", "dark", "light", "cube", "cubes", "box", "boxes", "ball", "balls", "sphere", "spheres",
    "cylinder", "cylinders", "can", "cans", "mug", "mugs", "cup", "cups", "block", "blocks", "bottle",
    "bottles", "bowl", "bowls", "plate", "plates", "screwdriver", "screwdrivers", "laptop", "phone", "object",
    "objects", "thing", "things", "small", "big", "large", "tiny", "little", "tall", "short", "medium",
    "wide", "narrow", "round", "square", "left", "right", "front", "back", "middle", "center", "centre",
    "top", "bottom", "leftmost", "rightmost", "frontmost", "backmost", "nearest", "farthest", "closest",
    "biggest", "smallest", "largest", "first", "second", "third", "last", "other", "of", "next", "to", "near",
    "behind", "between", "on", "in", "under", "above", "below", "beside", "inside", "outside", "all", "every",
    "each", "any", "both", "the", "a", "an", "and", "or", "one", "two", "three", "with", "without", "is",
    "are", "there", "no", "not", "find", "locate", "detect", "segment", "show", "me", "pick", "up", "grab",
    "take", "point", "at", "where", "please", "it", "user", "assistant", "system", "bbox_2d", "label",
    "point_2d", "json", "no_match",
)

#: The fixed pieces of a grounding answer (grounding.format_answer), one token each: with them an
#: object costs about 15 tokens instead of 35, which halves decoding time on a CPU.
ANSWER_PIECES = ('{"bbox_2d": [', '], "label": "', '"}', ", ")

#: The same for label-first answers (``format_answer(..., label_first=True)``); at the end of the
#: vocabulary, so the ids of every other token are those of tokenizers built before them.
LABEL_FIRST_PIECES = ('{"label": "', '", "bbox_2d": [', "]}")

#: Pre-tokenizer: the answer pieces, words (with their leading space), integers, single whitespace
#: characters, single symbols.
_PIECES = ("|".join(re.escape(p) for p in (*ANSWER_PIECES, *LABEL_FIRST_PIECES))
           + r"| ?[a-z_][a-z0-9_]*|\d+|\s|[^\sa-z0-9_]")

#: Sizes of the real Qwen3-VL models (shared/notes/qwen3-vl-seg.md), for configs without weights.
REFERENCE_SIZES: dict[str, dict[str, Any]] = {
    "2B": dict(text_hidden=2048, text_layers=28, text_heads=16, text_kv_heads=8, text_ffn=6144,
               head_dim=128, vision_depth=24, vision_hidden=1024, vision_heads=16, vision_ffn=4096,
               deepstack=(5, 11, 17), tie_embeddings=True, vocab_size=151936),
    "4B": dict(text_hidden=2560, text_layers=36, text_heads=32, text_kv_heads=8, text_ffn=9728,
               head_dim=128, vision_depth=24, vision_hidden=1024, vision_heads=16, vision_ffn=4096,
               deepstack=(5, 11, 17), tie_embeddings=True, vocab_size=151936),
    "8B": dict(text_hidden=4096, text_layers=36, text_heads=32, text_kv_heads=8, text_ffn=12288,
               head_dim=128, vision_depth=27, vision_hidden=1152, vision_heads=16, vision_ffn=4304,
               deepstack=(8, 16, 24), tie_embeddings=False, vocab_size=151936),
}

#: Default sizes of the tiny model (about 0.3M parameters).
TINY_SIZES: dict[str, Any] = dict(
    text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_ffn=128, head_dim=16,
    vision_depth=3, vision_hidden=32, vision_heads=2, vision_ffn=64, deepstack=(0, 1),
    tie_embeddings=True, vocab_size=None, patch_size=16, num_position_embeddings=64,
    image_min_pixels=32 * 32, image_max_pixels=128 * 128,
)

#: Mean answer-token loss at which fitting stops.
FIT_LOSS = 0.01

#: The answer the tiny checkpoint is fitted to give by default: one red cube.
DEFAULT_ANSWER = ({"bbox_2d": [300, 350, 600, 750], "label": "red cube"},)


def tokenizer_vocabulary(extra_words: Sequence[str] = ()) -> list[str]:
    """The tiny tokenizer's words: special tokens, unknown, whitespace, symbols, numbers, words."""
    words: list[str] = [UNK_TOKEN, " ", "\n", "\t", *ANSWER_PIECES]
    words += list("[]{}():,;.'\"?!-_/")
    words += [str(i) for i in range(1001)]
    template_words = re.findall(r"[a-z_]+", " ".join(PROMPT_TEMPLATES).lower())
    for word in [*TABLETOP_WORDS, *template_words, *(w.lower() for w in extra_words)]:
        for form in (word, " " + word):
            if form not in words:
                words.append(form)
    words += [p for p in LABEL_FIRST_PIECES if p not in words]
    return [*SPECIAL_TOKENS, *words]


def build_tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose decoding gives back the text exactly (for in-vocabulary text).

    Text is lowercased; unknown words become ``<unk>``. The special tokens are real added tokens,
    so ``skip_special_tokens=True`` drops ``<|seg|>`` and the chat tokens as with Qwen's own.
    """
    vocab = {token: i for i, token in enumerate(tokenizer_vocabulary(extra_words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECES), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor(min_pixels: int, max_pixels: int, patch_size: int = 16) -> Qwen2VLImageProcessorPil:
    """Qwen3-VL's image processor (PIL backend, no torchvision needed) with small pixel limits."""
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Splits head_dim/2 rotary frequencies over (t, h, w) like Qwen3-VL's [24, 20, 20] of 64."""
    half = head_dim // 2
    h = w = (half * 5) // 16
    return [half - h - w, h, w]


def qwen3vl_config(sizes: dict[str, Any], special_ids: dict[str, int] | None = None) -> Qwen3VLConfig:
    """A Qwen3VLConfig from our size keys (see :data:`TINY_SIZES`, :data:`REFERENCE_SIZES`).

    ``special_ids`` maps the image/video/vision-start/vision-end tokens to their ids in the
    tokenizer; without it Qwen3-VL's own ids are kept.
    """
    s = {**TINY_SIZES, **sizes}
    head_dim = int(s["head_dim"])
    text = dict(
        vocab_size=int(s["vocab_size"]), hidden_size=s["text_hidden"], intermediate_size=s["text_ffn"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"], head_dim=head_dim, max_position_embeddings=4096,
        tie_word_embeddings=bool(s["tie_embeddings"]),
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                         "mrope_section": _mrope_section(head_dim), "mrope_interleaved": True},
    )
    vision = dict(
        depth=s["vision_depth"], hidden_size=s["vision_hidden"], intermediate_size=s["vision_ffn"],
        num_heads=s["vision_heads"], patch_size=s.get("patch_size", 16), spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=s["text_hidden"],
        num_position_embeddings=int(s.get("num_position_embeddings", 2304)),
        deepstack_visual_indexes=list(s["deepstack"]),
    )
    ids = special_ids or {}
    config = Qwen3VLConfig(text_config=text, vision_config=vision,
                           tie_word_embeddings=bool(s["tie_embeddings"]), **ids)
    return config


def reference_qwen3vl_config(name: str = "4B") -> Qwen3VLConfig:
    """The configuration of a real Qwen3-VL model (no weights, nothing built)."""
    if name not in REFERENCE_SIZES:
        raise ValueError(f"unknown Qwen3-VL size {name!r}; known: {sorted(REFERENCE_SIZES)}")
    return qwen3vl_config({**REFERENCE_SIZES[name], "num_position_embeddings": 2304})


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _save_processor(folder: Path, tokenizer: PreTrainedTokenizerFast, sizes: dict[str, Any]) -> None:
    """Writes processor files in the layout of a Qwen3-VL checkpoint.

    The processor object itself cannot be built without torchvision (its video processor needs
    it), so the parts are saved one by one; ``AutoProcessor`` (or our loader's fallback) reads
    them back as a ``Qwen3VLProcessor``.
    """
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    image_processor = build_image_processor(sizes["image_min_pixels"], sizes["image_max_pixels"],
                                            sizes.get("patch_size", 16))
    image_processor.save_pretrained(folder)
    config_path = folder / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = "Qwen3VLProcessor"
    config_path.write_text(json.dumps(config, indent=2))
    video = {k: config[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                    "image_std", "size")}
    video.update(processor_class="Qwen3VLProcessor", video_processor_type="Qwen3VLVideoProcessor")
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


def _fitting_batch(processor: Any, answer_text: str, seed: int, size: int = 8) -> tuple[dict, torch.Tensor]:
    """One padded batch of random images and varied commands, all answered by ``answer_text``."""
    rng = np.random.default_rng(seed)
    commands = ["the red cube", "all cubes", "the blue ball and the green mug", "the mug left of the box"]
    texts, images, prompt_lengths = [], [], []
    for i in range(size):
        h, w = (int(v) for v in rng.choice([32, 48, 64, 96], size=2))
        images.append(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": build_prompt(commands[i % len(commands)])[0]}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_lengths.append(processor(text=[prompt], images=[images[-1]], return_tensors="pt")["input_ids"].shape[1])
        texts.append(prompt + answer_text + "<|im_end|>")
    inputs = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    for row, length in enumerate(prompt_lengths):
        labels[row, :length] = -100
    return inputs, labels


def _fit_answer(model: Qwen3VLForConditionalGeneration, tokenizer: PreTrainedTokenizerFast,
                sizes: dict[str, Any], answer_text: str, steps: int, seed: int) -> None:
    """Teaches the language model to give ``answer_text`` whatever the image and command.

    The vision tower stays frozen (the answer ignores the image), and one padded batch of
    varied inputs is reused; it stops once the mean token loss is below :data:`FIT_LOSS`
    (tokens then have probabilities near 0.99): a few seconds on a CPU.
    """
    from qwen3vl_seg_ros.model.loading import ImageOnlyQwen3VLProcessor

    processor = ImageOnlyQwen3VLProcessor(
        build_image_processor(sizes["image_min_pixels"], sizes["image_max_pixels"], sizes.get("patch_size", 16)),
        tokenizer, chat_template=CHAT_TEMPLATE)
    inputs, labels = _fitting_batch(processor, answer_text, seed)
    trainable = [p for n, p in model.named_parameters() if ".visual." not in f".{n}"]
    optimizer = torch.optim.Adam(trainable, lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops gain nothing from threads and suffer on a busy machine
    try:
        for _ in range(steps):
            loss = model(**inputs, labels=labels).loss
            if loss.item() < FIT_LOSS:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def build_tiny_checkpoint(
    folder: str | Path,
    decoder: bool = True,
    seed: int = 0,
    answer: Sequence[Any] | None = DEFAULT_ANSWER,
    mask_token: bool = True,
    fit_steps: int = 200,
    label_first: bool = False,
    **sizes: Any,
) -> Path:
    """Builds and saves a tiny Qwen3-VL(-Seg) checkpoint that the production loader can read.

    ``folder`` receives config, safetensors weights, tokenizer, processor files and chat
    template; with ``decoder`` also a randomly initialised mask decoder checkpoint sized for the
    model (``mask_decoder.safetensors`` + ``mask_decoder_config.json``), making it a combined
    folder. ``answer`` (objects as for :func:`~qwen3vl_seg_ros.grounding.format_answer`, relative
    coordinates) makes the model always answer that, followed by ``<|seg|>`` per object when
    ``mask_token`` (each label before its box with ``label_first``); ``answer=None`` keeps the
    random model. ``sizes`` override :data:`TINY_SIZES`
    (e.g. ``text_hidden=256, vision_hidden=128, text_layers=4``). Takes a few seconds on a CPU.
    """
    from qwen3vl_seg_ros.model.checkpoint import save_decoder
    from qwen3vl_seg_ros.model.configuration import MaskDecoderConfig
    from qwen3vl_seg_ros.model.mask_decoder import BoxGuidedMaskDecoder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = {**TINY_SIZES, **sizes}
    unknown = set(sizes) - set(TINY_SIZES)
    if unknown:
        raise ValueError(f"unknown size keys {sorted(unknown)}; known: {sorted(TINY_SIZES)}")
    tokenizer = build_tokenizer()
    s["vocab_size"] = s["vocab_size"] or len(tokenizer)
    config = qwen3vl_config(s, _special_ids(tokenizer))
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).float()
    if answer is not None:
        _fit_answer(model, tokenizer, s, format_answer(answer, mask_token, label_first), fit_steps, seed)
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    _save_processor(folder, tokenizer, s)
    if decoder:
        torch.manual_seed(seed + 1)
        save_decoder(BoxGuidedMaskDecoder(MaskDecoderConfig.for_qwen3vl(config, size="tiny")), folder)
    return folder
