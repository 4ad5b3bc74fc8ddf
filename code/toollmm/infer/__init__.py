"""Inference: the runtime behind ``toollmm.load`` and the layer around the decode engine.

* ``runtime``  — ``Runtime`` (renderer prompt + encoder media + decode engine over the model) and ``load``
* ``step``     — ``ToolLMMStepModel``: the composed model behind the engine (KV cache per row); ``project_signal``
* ``batched_step`` — ``BatchedStepModel``: the server's step model (a batch's rows in one forward per step)
* ``kernel_check`` — ``kernel_invariants``: packed rows vs each sample alone, cache appends vs one forward
* ``media``    — ``MediaSink`` (output folder, file names, seeds) and ``SignalDecoder`` (the signal hook:
  output projection -> diffusion decoder -> PNG / MP4 / WAV; also text -> media for the tools)
* ``tools``    — the model's own abilities bound as tool backends (generation, captioning, QA)
* ``session``  — ``ChatSession``: multi-turn history with media in any turn
* ``requests`` — ``Request``; requests from a prompt + media, or from ``--batch`` JSONL lines (checked up front)
* ``output``   — the ``--json`` result form and streamed text (``TextStream``)
"""
