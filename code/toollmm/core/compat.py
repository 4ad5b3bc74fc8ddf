"""Import-time fixes for third-party packages, in one place. Import this before ``imagebind``.

pytorchvideo 0.1.5 (imported by ``imagebind.data``) does
``import torchvision.transforms.functional_tensor``, a module torchvision removed in 0.17; its
successor is ``torchvision.transforms._functional_tensor``. We alias the old name instead of
patching site-packages. (ImageBind #102 is the same family of pytorchvideo breakage.)
"""

from __future__ import annotations

import importlib
import sys
import warnings

_DONE = False


def apply() -> None:
    """Idempotent."""
    global _DONE
    if _DONE:
        return
    name = "torchvision.transforms.functional_tensor"
    if name not in sys.modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            sys.modules[name] = importlib.import_module("torchvision.transforms._functional_tensor")
    # imagebind.data imports pkg_resources, which warns on import; the warning is not actionable for users.
    warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated.*")
    _DONE = True


def import_imagebind():
    """Import the ``imagebind`` package (models + data) with the fixes applied; returns the package."""
    apply()
    import imagebind  # noqa: F401
    import imagebind.data  # noqa: F401
    import imagebind.models.imagebind_model  # noqa: F401

    return sys.modules["imagebind"]
