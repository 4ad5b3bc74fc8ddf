"""The multimodal model: frozen ImageBind encoder, projections, LLM, decoders (see the submodules)."""
