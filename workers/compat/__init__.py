"""Root of the TorchServe compatibility layer; not meant to be imported as a package.

This directory is put on ``sys.path`` (``workers.handling.compat.install_compat_path``)
so that handler code's ``import ts`` finds ``workers/compat/ts`` when TorchServe
itself is not installed. Where mqserve is installed, ``startup/`` does the same for
every interpreter: the wheel puts its finder and ``.pth`` file at the top of
site-packages (see ``startup/_mqserve_ts_fallback.py``), so scripts importing
``ts.launcher`` work too. Modules inside ``ts`` import each other relatively, so they
work under either name.
"""
