"""On PYTHONPATH, makes `import nvidia.dali` fail as on a machine without DALI (the bare GPU
machine): for rehearsing the GPU scripts on a machine that has it. Nothing else changes."""
import importlib.abc
import sys


class _NoDali(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tools/hide-dali)", name=name)
        return None


sys.meta_path.insert(0, _NoDali())
