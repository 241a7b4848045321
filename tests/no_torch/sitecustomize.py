"""On PYTHONPATH, this makes torch and transformers look uninstalled: every import finder is
wrapped to find nothing for them, so `import torch` raises ModuleNotFoundError and
importlib.util.find_spec("torch") is None, as on a machine without them."""

import sys

HIDDEN = ("torch", "transformers")


class _Without:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [_Without(f) for f in sys.meta_path]
