"""xvq: quantization and export pipeline for XVERSE models and their LLaMA cousins.

Importing xvq registers XVERSE with transformers' Auto classes, so `from_pretrained` loads
XVERSE folders without remote code. transformers takes seconds to import, so when it is not
loaded yet the registration runs the moment it is (the CLI's GGUF commands never pay for it).
"""
import importlib
import importlib.abc
import sys

__version__ = "0.1.0"


def _register() -> None:
    # xvq.models.hf registers itself when its import completes; when the hook fires because
    # that very module is importing transformers, it is already on its way.
    if "xvq.models.hf" not in sys.modules:
        importlib.import_module("xvq.models.hf")


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()
        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
    import importlib.util
    sys.meta_path.insert(0, _AfterTransformersImport())
