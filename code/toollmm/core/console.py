"""What the entry points print while they work: library progress bars off, our own progress on stderr.

transformers ("Loading weights"), diffusers ("Loading pipeline components...") and huggingface_hub
(downloads) draw tqdm bars with carriage returns on stderr whenever they load something. On a terminal a
bar drawn while an answer is streaming lands on the answer's line (a decoder is loaded lazily, in the
middle of a turn), and in a log file every refresh is one more ``\\r`` update. The entry points turn them
off with :func:`quiet_library_progress` and say what they do in plain lines of their own.
"""

from __future__ import annotations


def quiet_library_progress() -> None:
    """Turn off the progress bars of transformers, diffusers and huggingface_hub in this process (their
    log messages are unaffected). Called by the entry points, never on import."""
    import huggingface_hub.utils
    import transformers.utils.logging

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        import diffusers.utils.logging
    except ImportError:  # pragma: no cover - diffusers is a pinned dependency
        return
    diffusers.utils.logging.disable_progress_bar()
