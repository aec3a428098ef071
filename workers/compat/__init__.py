"""Root of the TorchServe compatibility layer; not meant to be imported as a package.

This directory is put on ``sys.path`` (``workers.handling.compat.install_compat_path``)
so that handler code's ``import ts`` finds ``workers/compat/ts`` when TorchServe
itself is not installed. Modules inside ``ts`` import each other relatively, so they
work under either name.
"""
