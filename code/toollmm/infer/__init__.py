"""The inference layer around the decode engine (used by ``toollmm.inference_api.Runtime``).

* ``media``    — ``MediaSink`` (output folder, file names, seeds) and ``SignalDecoder`` (the signal hook:
  output projection -> diffusion decoder -> PNG / MP4 / WAV; also text -> media for the tools)
* ``tools``    — the model's own abilities bound as tool backends (generation, captioning, QA)
* ``session``  — ``ChatSession``: multi-turn history with media in any turn
* ``requests`` — requests from a prompt + media, or from ``--batch`` JSONL lines (checked up front)
* ``output``   — the ``--json`` result form and streamed text (``TextStream``)
"""
