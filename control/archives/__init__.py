"""The archive store: resolving a registration's ``url`` to an archive in the model store
(``store``), fetching allowed URLs (``download``) and safe unpacking (``unpack``).
"""
