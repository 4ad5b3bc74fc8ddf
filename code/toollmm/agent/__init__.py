"""The tool agent: registry, declared tool sets, sandboxed execution and the decode state machine.

* ``registry``  — ``ToolSpec``, ``ToolResult``, ``Registry`` (validate + run, never raises), ``@tool``
* ``toolsets``  — GPT4Tools / VIoTGPT / MLLM-Tool declarations (exact upstream names), prompt rendering,
  ``registry_from_config`` (a session's registry from the config)
* ``builtin``   — model-side tools (bound later by the inference layer) and the PIL edge-detection backend
* ``sandbox``   — workspace confinement of file arguments; killable subprocess runs with a timeout
* ``engine`` reads calls with ``toollmm.core.toolcall`` and ``toollmm.core.react`` (the scorers' parsers)
* ``engine``    — ``Engine``: batched decode with forced tool results and signal-span hooks
* ``protocol``  — ``StepModel`` / ``StepOutput``: what a model implements to be driven by the engine
* ``scripted``  — ``ScriptedModel``: a model that writes chosen token sequences (tests, demos)
* ``hf_step``   — ``CausalLMStepModel``: the protocol over any HF causal LM (text only, per-row KV cache)

Importing the package is cheap (tool processes import ``toollmm.agent.sandbox``); the names below load
on first use. ``engine``, ``protocol`` and ``hf_step`` import torch.
"""

__all__ = ["Registry", "ToolResult", "ToolSpec", "tool"]


def __getattr__(name: str):
    if name in __all__:
        from toollmm.agent import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
