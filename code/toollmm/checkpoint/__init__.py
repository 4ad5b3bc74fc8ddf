"""Checkpoints: what training writes and everything else loads.

    stage.py   stage folders: save_stage, load_stage (THE loader), read_manifest, the config a folder
               loads with, export_llm
    delta.py   the delta inside a stage folder: new token rows + projections (safetensors) + peft adapter
    bases.py   the base models: identity (path / Hub id + sha256) and the documented places and Hub ids

This package imports the model and the ground floor (config, paths, errors) only: never training,
inference, release or evaluation code.
"""
