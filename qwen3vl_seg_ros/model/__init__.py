"""Qwen3-VL-Seg: Qwen3-VL grounding plus the box-guided mask decoder (ROS-free).

One component per module; the segmenter the node uses is
:class:`qwen3vl_seg_ros.model.segmenter.Qwen3VLSeg`.

* ``configuration``: ``MaskDecoderConfig``, saved as JSON.
* ``feature_injection``: multi-scale ViT features -> memory map.
* ``query_encoder``: box Fourier encoding + LLM hidden state -> object queries.
* ``pixel_fusion``: CNN stem on the raw image, box gate, high-resolution fusion.
* ``mask_decoder``: ``BoxGuidedMaskDecoder`` (iterative refinement, IoU head).
* ``graphed_decoder``: CUDA-graph replay of the decoder on a GPU.
* ``vision_capture``: vision features recorded during the LLM's own vision pass.
* ``generation``: greedy decoding returning tokens, probabilities and hidden states.
* ``token_choice``: picking each token from the logits (greedy, or box numbers by a window).
* ``cuda_graph``: capturing a function as a CUDA graph.
* ``fast_generation``: the GPU fast path (static KV cache, graphed decode step and prefill).
* ``score_calibration``: raw scores mapped to the probability of a right answer.
* ``checkpoint``: safetensors decoder checkpoints.
* ``loading``: model folder / hub id resolution, processor and model loading.
* ``segmenter``: ``Qwen3VLSeg``.
* ``tiny``: tiny Qwen3-VL checkpoints and reference sizes (tests, demos, training).

Modules are imported on use: importing this package does not import transformers.
"""
