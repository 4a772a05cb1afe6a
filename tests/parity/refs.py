"""What the parity tests share: the reference checkout under $SSL_REFS (the calling module is skipped
without it), the difference measure, loading one reference file as a module, and a 1-process gloo
group for references that call torch.distributed."""
import contextlib
import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest
import torch


def checkout(name, marker):
    """$SSL_REFS/<name> when it holds `marker` (a file of that repository); else skips the module."""
    ref = Path(os.environ.get('SSL_REFS', '/nonexistent')) / name
    if not os.environ.get('SSL_REFS') or not (ref / marker).is_file():
        pytest.skip(f'set SSL_REFS to a folder holding {name}', allow_module_level=True)
    return ref


def rel(a, b):
    """Max |a - b| divided by max |a| when that exceeds 1; absolute below (rounding noise on tensors
    whose exact value is 0, such as moments of vanishing gradients, would otherwise look large)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / a.abs().max().clamp(min=1.0)).item()


def load(name, path):
    """The file at `path` imported as module `name` (registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def one_process_group():
    """A gloo group of this process alone (rank 0 of 1) unless one exists; destroyed on exit if ours."""
    import torch.distributed as tdist
    own = not tdist.is_initialized()
    if own:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        tdist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    try:
        yield
    finally:
        if own:
            tdist.destroy_process_group()


def import_isolated(ref, names, also=(), stubs=None):
    """The modules `names` imported from the checkout folder `ref`, with `stubs` (name -> module) in
    sys.modules while they import. Afterwards sys.path and sys.modules are as before (`names`, the
    modules they pull in listed in `also`, and the stubs are dropped), so a reference's generic module
    names (utils, src) shadow nothing of ours or of another reference."""
    stubs = stubs or {}
    purge = (*names, *also, *stubs)
    saved = {k: sys.modules.pop(k) for k in purge if k in sys.modules}
    sys.modules.update(stubs)
    sys.path.insert(0, str(ref))
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        sys.path.remove(str(ref))
        for k in purge:
            sys.modules.pop(k, None)
        sys.modules.update(saved)
